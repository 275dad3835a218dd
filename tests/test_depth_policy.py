"""Load-adaptive depth: the policy's cap under a load test (KV usage target, small pool, so with
preemption), requests that did not opt in unchanged against the fixed policy, opted-in ones
exact against the reference forward with the per-position caps they were routed with."""

from __future__ import annotations

import random

import pytest
import torch

from engine_utils import check_against_reference, tiny_model
from morserve.engine import EngineArgs, LLMEngine, SamplingParams
from morserve.engine.depth_policy import DepthPolicy

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_policy_lowers_under_load_and_restores_with_cooldown():
    policy = DepthPolicy("adaptive", "kv_usage", 0.5, num_recursions=3, cooldown=2)
    caps = [policy.cap for load in [0.9] * 6 + [0.1] * 6 if policy.update(0.0, load) or True]
    assert caps == [2, 2, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    fixed = DepthPolicy("fixed", "queue_time", 0.1, num_recursions=3)
    assert not any(fixed.update(5.0, 1.0) for _ in range(20)) and fixed.cap == 3
    with pytest.raises(ValueError, match="depth_policy_metric"):
        DepthPolicy("adaptive", "latency", 1.0, 3)
    with pytest.raises(ValueError, match="depth_policy"):
        EngineArgs(depth_policy="sometimes").validate()


def run(engine: LLMEngine, arrivals: dict[int, list]) -> tuple[dict, dict, list[int]]:
    arrivals = {k: list(v) for k, v in arrivals.items()}
    caps_seen: list[int] = []
    engine.tick_listeners.append(lambda stats: caps_seen.append(stats.depth_cap))
    requests, finished, tick = {}, {}, 0
    while engine.has_unfinished_requests() or arrivals:
        for args in arrivals.pop(tick, []):
            requests[args[0]] = engine.add_request(*args)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        tick += 1
        assert tick < 20000
    return finished, requests, caps_seen


@pytest.mark.parametrize("router", ["expert", "token"])
def test_adaptive_policy_changes_only_opted_in_requests(router):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = tiny_model(router, "recursion", 3, seed=seed)
    arrivals: dict[int, list] = {}
    for i in range(16):
        prompt = [rng.randrange(97) for _ in range(rng.randint(10, 30))]
        params = SamplingParams(max_tokens=rng.randint(8, 16), allow_depth_reduction=i % 2 == 0, **GREEDY)
        arrivals.setdefault(rng.randrange(20), []).append((f"r{i}", prompt, params))
    args = dict(model=model, max_num_batched_tokens=32, block_size=4, num_kv_blocks=220, max_num_seqs=8)
    fixed, _, _ = run(LLMEngine(model, None, EngineArgs(**args)), arrivals)
    engine = LLMEngine(model, None, EngineArgs(**args, depth_policy="adaptive", depth_policy_metric="kv_usage",
                                               depth_policy_target=0.3))
    engine.depth_policy.cooldown = 3
    adaptive, requests, caps_seen = run(engine, arrivals)
    assert min(caps_seen) < 3, f"seed {seed}: the cap never dropped: {caps_seen}"
    assert engine.check_no_leak()
    for _ in range(3 * 3):                          # idle ticks: no load, the cap comes back
        engine.step()
    assert engine.depth_policy.cap == 3 and engine.last_tick.depth_cap == 3
    changed = 0
    for reqs in arrivals.values():
        for rid, prompt, params in reqs:
            a, b = fixed[rid].outputs[0], adaptive[rid].outputs[0]
            if not params.allow_depth_reduction:
                assert (a.token_ids, a.depths) == (b.token_ids, b.depths), f"seed {seed}: {rid} changed"
                continue
            seq = requests[rid].seqs[0]
            caps = torch.tensor(seq.caps.span(0, len(prompt) + len(b.token_ids)))
            assert all(d <= c for d, c in zip(b.depths, caps[len(prompt) - 1:].tolist()))
            check_against_reference(model, prompt, b.token_ids, b.depths, max_depth=caps)
            changed += len(seq.caps.caps) > 1 or seq.caps.current < 3
    assert changed, f"seed {seed}: no opted-in request was capped"
