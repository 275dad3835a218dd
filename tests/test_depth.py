"""Per-request depth overrides (SamplingParams.max_depth, router_threshold): the engine against the
dense reference forward with the same overrides, for every router, both KV modes, both batching
modes and the multi-step decode loop, mixed in one batch; errors name the field."""

from __future__ import annotations

import random

import pytest

from engine_utils import check_against_reference, run_to_completion, tiny_model
from morserve.engine import EngineArgs, LLMEngine, SamplingParams
from morserve.engine.depth import DepthCaps

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(model, **kw) -> LLMEngine:
    args = dict(model=model, max_num_batched_tokens=48, block_size=4, num_kv_blocks=3000, max_num_seqs=16)
    args.update(kw)
    return LLMEngine(model, None, EngineArgs(**args))


def override_workload(rng: random.Random, model, n: int) -> dict[int, list]:
    mor = model.config.mor
    arrivals: dict[int, list] = {}
    for i in range(n):
        over = {}
        if rng.random() < 0.8:
            over["max_depth"] = rng.randint(1, mor.num_recursions)
        if mor.router == "expert" and rng.random() < 0.6:
            over["router_threshold"] = rng.uniform(0.3, 0.7)
        prompt = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 30))]
        params = SamplingParams(max_tokens=rng.randint(1, 10), **GREEDY, **over)
        arrivals.setdefault(rng.randrange(4), []).append((f"r{i}", prompt, params))
    return arrivals


@pytest.mark.parametrize("router", ["expert", "token", None])
@pytest.mark.parametrize("kv_mode", ["recursion", "share_first"])
def test_overrides_match_reference_with_the_same_overrides(router, kv_mode):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = tiny_model(router, kv_mode, 3, seed=seed)
    for engine_kw in (dict(batching="depthwise"), dict(batching="vanilla"), dict(num_scheduler_steps=4)):
        arrivals = override_workload(rng, model, n=8)
        engine = make_engine(model, **engine_kw)
        results = run_to_completion(engine, {k: list(v) for k, v in arrivals.items()})
        ties = total = 0
        for reqs in arrivals.values():
            for rid, prompt, params in reqs:
                out = results[rid].outputs[0]
                cap = params.max_depth or 3
                assert max(out.depths) <= cap, f"seed {seed}: depth above max_depth {cap}"
                ties += check_against_reference(model, prompt, out.token_ids, out.depths,
                                                params.max_depth, params.router_threshold)
                total += len(out.token_ids)
        assert ties <= max(1, total // 100), f"seed {seed}: {ties} near-ties in {total} tokens"
        assert engine.check_no_leak()


def test_max_depth_one_keeps_every_token_at_depth_one_and_changes_outputs():
    model = tiny_model("expert", "recursion", 3, seed=5)
    engine = make_engine(model)
    prompt = list(range(3, 40))
    engine.add_request("full", prompt, SamplingParams(max_tokens=12, **GREEDY))
    engine.add_request("one", prompt, SamplingParams(max_tokens=12, max_depth=1, **GREEDY))
    engine.add_request("thr", prompt, SamplingParams(max_tokens=12, router_threshold=0.0, **GREEDY))
    res = run_to_completion(engine)
    assert set(res["one"].outputs[0].depths) == {1}
    assert set(res["thr"].outputs[0].depths) == {3}          # threshold 0: every token goes the whole way
    assert res["full"].outputs[0].depths != res["one"].outputs[0].depths


@pytest.mark.parametrize("router,params,field", [
    ("expert", dict(max_depth=0), "max_depth"),
    ("expert", dict(max_depth=4), "max_depth"),
    ("token", dict(max_depth=5), "max_depth"),
    ("expert", dict(max_depth=2.0), "max_depth"),
    ("expert", dict(router_threshold=1.5), "router_threshold"),
    ("expert", dict(router_threshold=float("nan")), "router_threshold"),
    ("token", dict(router_threshold=0.5), "router_threshold"),
    (None, dict(router_threshold=0.5), "router_threshold"),
    ("expert", dict(allow_depth_reduction="yes"), "allow_depth_reduction"),
])
def test_bad_overrides_are_rejected_naming_the_field(router, params, field):
    model = tiny_model(router, "recursion", 3, seed=1)
    engine = make_engine(model)
    with pytest.raises(ValueError, match=field):          # SamplingParams or the engine refuses it
        engine.add_request("bad", [1, 2, 3], SamplingParams(max_tokens=2, **GREEDY, **params))
    assert not engine.has_unfinished_requests() and engine.check_no_leak()
    engine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=2, **GREEDY))
    assert len(run_to_completion(engine)["ok"].outputs[0].token_ids) == 2


def test_depth_caps_segments():
    caps = DepthCaps(3)
    caps.set_from(5, 2)
    caps.set_from(9, 1)
    assert [caps.at(p) for p in range(12)] == [3] * 5 + [2] * 4 + [1] * 3
    assert caps.span(3, 11) == [3, 3, 2, 2, 2, 2, 1, 1]
    caps.set_from(9, 2)                         # back to 2 at the same position: one segment again
    assert caps.starts == [0, 5] and caps.current == 2
    with pytest.raises(ValueError):
        caps.set_from(4, 1)
