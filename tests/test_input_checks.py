"""Engine-side request safety: SamplingParams refuses every value the engine cannot represent
(naming the field), the shared input checks, a request whose sampling fails fails alone (its
error to its stream, every other request exact, the engine thread alive), and logit_bias."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
import torch

from morserve.engine import AsyncLLMEngine, EngineArgs, LLMEngine, ParamError, RequestFailedError, SamplingParams
from morserve.engine.input_checks import check_request, check_text_length
from morserve.engine.sampler import SamplingRow, sample
from tests.engine_utils import run_to_completion, tiny_model

BIG = 2**63


@pytest.mark.parametrize("field,value", [
    ("top_k", BIG), ("top_k", 2**70), ("top_k", -2), ("top_k", 1.5), ("n", 0), ("n", 10**9), ("n", True),
    ("max_tokens", BIG), ("max_tokens", 0), ("min_tokens", BIG), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", 101.0), ("top_p", math.nan), ("min_p", math.inf),
    ("presence_penalty", math.nan), ("frequency_penalty", -math.inf), ("repetition_penalty", math.nan),
    ("logprobs", 21), ("logprobs", BIG), ("prompt_logprobs", -1), ("seed", 1.5), ("stop_token_ids", [BIG]),
    ("logit_bias", {3: 101.0}), ("logit_bias", {3: math.nan}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"3": 1.0}),
])
def test_sampling_params_refuse_what_the_engine_cannot_represent(field, value):
    with pytest.raises(ParamError, match=field) as exc:
        SamplingParams(**{field: value})
    assert exc.value.param == field


def make_engine(model, **kw) -> LLMEngine:
    args = dict(model=model, max_num_batched_tokens=64, block_size=4, num_kv_blocks=2000, max_num_seqs=16)
    return LLMEngine(model, None, EngineArgs(**{**args, **kw}))


def test_shared_checks_name_the_field():
    engine = make_engine(tiny_model(vocab=50))
    limits = engine.limits
    assert check_request([1, 2], SamplingParams(max_tokens=None), limits) == engine.max_model_len - 2
    cases = [([1] * engine.max_model_len, SamplingParams(), "prompt"),
             ([1, 2], SamplingParams(max_tokens=engine.max_model_len), "max_tokens"),
             ([1, 2], SamplingParams(logit_bias={50: 1.0}), "logit_bias"),
             ([1, 2], SamplingParams(min_tokens=1, stop_token_ids=list(range(50))), "stop_token_ids")]
    for ids, params, param in cases:
        with pytest.raises(ParamError) as exc:
            check_request(ids, params, limits)
        assert exc.value.param == param, exc.value
    with pytest.raises(ParamError, match="50"):
        engine.add_request("oov", [1, 50], SamplingParams())
    assert engine.check_no_leak()


def test_text_length_bound_refuses_only_what_cannot_fit():
    engine = make_engine(tiny_model(vocab=50))
    limits = type(engine.limits)(**{**engine.limits.__dict__, "max_token_chars": 7})
    bound = limits.max_model_len * 7 * 2
    check_text_length(bound, limits)
    with pytest.raises(ParamError, match="characters"):
        check_text_length(bound + 1, limits)


def test_one_requests_sampling_failure_fails_it_alone():
    """A value that slips past validation (set after it) makes the sampler raise in the engine:
    that request ends with its error, the others match their solo runs exactly."""
    model = tiny_model("expert", "recursion", 3, seed=5)
    rng = random.Random(11)
    prompts = {f"r{i}": [rng.randrange(1, 97) for _ in range(rng.randrange(3, 12))] for i in range(4)}
    params = {rid: SamplingParams(max_tokens=8, temperature=0.8, top_k=5, seed=i, ignore_eos=True)
              for i, rid in enumerate(prompts)}
    solo = {rid: run_to_completion(make_engine(model), {0: [(rid, prompts[rid], params[rid])]})[rid]
            for rid in prompts}
    engine = make_engine(model)
    for rid in prompts:
        engine.add_request(rid, prompts[rid], SamplingParams(**params[rid].__dict__))
    engine.requests["r2"].params.top_k = 2**64            # overflows the sampler's int64 tensor
    out = run_to_completion(engine)
    assert out["r2"].error and "r2" not in engine.requests
    for rid in ("r0", "r1", "r3"):
        assert out[rid].error is None
        assert out[rid].outputs[0].token_ids == solo[rid].outputs[0].token_ids
    assert engine.check_no_leak()


def test_async_engine_delivers_the_failure_and_keeps_serving():
    model = tiny_model("expert", "recursion", 2, seed=6)
    engine = AsyncLLMEngine(make_engine(model))

    async def main():
        async def bad():
            stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=50, top_k=3, ignore_eos=True), "bad")
            first = await stream.__anext__()
            engine.engine.requests["bad"].params.top_k = 2**64
            with pytest.raises(RequestFailedError):
                async for _ in stream:
                    pass
            return first

        async def good():
            return [o async for o in engine.generate([4, 5], SamplingParams(max_tokens=20, temperature=0,
                                                                            ignore_eos=True), "good")][-1]
        return await asyncio.gather(bad(), good())

    try:
        _, last = asyncio.run(main())
        assert last.finished and len(last.outputs[0].token_ids) == 20 and engine.error is None
        assert engine.engine.check_no_leak()
    finally:
        engine.shutdown()


def test_logit_bias_is_added_to_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    bias = {int(t): float(b) for t, b in zip(torch.randperm(40)[:6], torch.empty(6).uniform_(-100, 100))}
    rows = [SamplingRow(SamplingParams(temperature=t, seed=9, logit_bias=bias if i != 1 else None), [1], [], [], 9 + i, 4)
            for i, t in enumerate((0.0, 0.0, 0.7))]
    got = sample(logits, rows)
    biased = logits.clone()
    for t, b in bias.items():
        biased[[0, 2], t] += b
    plain = [SamplingRow(SamplingParams(temperature=r.params.temperature, seed=9), [1], [], [], r.seed, 4) for r in rows]
    want = sample(biased, plain)
    assert [g.token for g in got] == [w.token for w in want]
    raw = torch.log_softmax(logits, -1)          # reported logprobs stay the model's own
    assert all(abs(g.logprob - float(raw[i, g.token])) < 1e-5 for i, g in enumerate(got))


def test_logit_bias_steers_the_engine_greedy_output():
    model = tiny_model("expert", "recursion", 2, seed=8)
    plain = run_to_completion(make_engine(model), {0: [("p", [3, 4, 5], SamplingParams(max_tokens=6, temperature=0))]})
    first = plain["p"].outputs[0].token_ids[0]
    forced = 17 if first != 17 else 18
    out = run_to_completion(make_engine(model, num_scheduler_steps=4), {0: [
        ("f", [3, 4, 5], SamplingParams(max_tokens=6, temperature=0, logit_bias={forced: 100.0})),
        ("b", [3, 4, 5], SamplingParams(max_tokens=1, temperature=0, logit_bias={first: -100.0}))]})
    assert out["f"].outputs[0].token_ids == [forced] * 6
    assert out["b"].outputs[0].token_ids[0] != first
