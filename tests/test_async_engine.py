"""AsyncLLMEngine: token-by-token streams, concurrency, validation errors, cancellation frees KV."""

from __future__ import annotations

import asyncio

import pytest

from engine_utils import check_against_reference, tiny_model
from morserve.engine import AsyncLLMEngine, EngineArgs, LLMEngine, SamplingParams


def make_async(model) -> AsyncLLMEngine:
    args = EngineArgs(model=model, max_num_batched_tokens=64, block_size=4, num_kv_blocks=2000)
    return AsyncLLMEngine(LLMEngine(model, None, args))


async def wait_until(pred, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_streams_interleave_and_match_reference():
    model = tiny_model("expert", "recursion", 3, seed=21)
    engine = make_async(model)

    async def one(i):
        prompt = [i + 1, i + 2, i + 3]
        counts = []
        async for out in engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), f"r{i}"):
            counts.append(len(out.outputs[0].token_ids))
        return prompt, out, counts

    async def main():
        return await asyncio.gather(*(one(i) for i in range(12)))

    try:
        results = asyncio.run(main())
        for prompt, out, counts in results:
            assert out.finished and counts == list(range(1, 11))       # one new token per output
            check_against_reference(model, prompt, out.outputs[0].token_ids, out.outputs[0].depths)
        assert engine.engine.check_no_leak()
    finally:
        engine.shutdown()


def test_invalid_request_raises_and_engine_keeps_serving():
    model = tiny_model("token", "recursion", 2, seed=22)
    engine = make_async(model)

    async def main():
        with pytest.raises(ValueError, match="token ids"):
            async for _ in engine.generate([1, 10_000], SamplingParams(), "bad"):
                pass
        outs = [o async for o in engine.generate([1, 2], SamplingParams(max_tokens=3, temperature=0), "good")]
        return outs[-1]

    try:
        last = asyncio.run(main())
        assert last.finished and len(last.outputs[0].token_ids) >= 1
    finally:
        engine.shutdown()


def test_cancelled_stream_frees_its_blocks():
    model = tiny_model("expert", "recursion", 3, seed=23)
    engine = make_async(model)

    async def main():
        async def consume():
            async for _ in engine.generate(list(range(1, 40)), SamplingParams(max_tokens=200, temperature=0,
                                                                              ignore_eos=True), "long"):
                pass
        task = asyncio.create_task(consume())
        await wait_until(lambda: engine.engine.num_running == 1 and not engine.engine.blocks.all_free())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.engine.check_no_leak())
        return engine.engine.has_unfinished_requests()

    try:
        assert asyncio.run(main()) is False
    finally:
        engine.shutdown()
