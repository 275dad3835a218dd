"""The two drivers of the tick's phases (per-tick runner, multi-step decode loop) must be the same
computation: the same greedy tokens, depths, log-probabilities and per-depth work, tick for tick,
for every router kind and KV mode; and the cache-stage map must be one rule on host and device."""

from __future__ import annotations

import random

import pytest
import torch

from engine_utils import run_to_completion, tiny_model
from kernels.reference import cache_stage_fields
from morserve.engine import EngineArgs, LLMEngine, SamplingParams
from morserve.engine.stages import CacheStages


def _run(model, steps: int, batching: str, prompts: dict[str, list[int]], max_tokens: int):
    engine = LLMEngine(model, None, EngineArgs(model=model, max_num_batched_tokens=64, block_size=4,
                                                num_kv_blocks=2000, max_num_seqs=16, batching=batching,
                                                num_scheduler_steps=steps))
    ticks = []
    engine.tick_listeners.append(ticks.append)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    results = run_to_completion(engine, {0: [(rid, p, params) for rid, p in prompts.items()]})
    assert engine.check_no_leak()
    return results, [t for t in ticks if t.num_block_tokens or t.num_prologue_tokens], engine


@pytest.mark.parametrize("batching", ["depthwise", "vanilla"])
@pytest.mark.parametrize("router, kv_mode", [("expert", "recursion"), ("token", "share_first"),
                                             ("token", "recursion"), ("expert", "share_first"), (None, "recursion")])
def test_decode_loop_is_the_per_tick_engine(batching, router, kv_mode):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    nr = 1 if router is None else 3
    model = tiny_model(router, kv_mode, nr, seed=seed)
    prompts = {f"r{i}": [rng.randrange(97) for _ in range(rng.randint(1, 12))] for i in range(6)}
    plain, plain_ticks, _ = _run(model, 1, batching, prompts, 12)
    looped, loop_ticks, engine = _run(model, 4, batching, prompts, 12)
    assert engine.decode_loop is not None
    for rid in prompts:
        a, b = plain[rid].outputs[0], looped[rid].outputs[0]
        assert a.token_ids == b.token_ids, (seed, rid)
        assert a.depths == b.depths, (seed, rid)
        for x, y in zip(a.logprobs, b.logprobs):
            assert list(x) == list(y)
            assert abs(next(iter(x.values())) - next(iter(y.values()))) < 1e-4
    # tick for tick the same work (tokens per depth, exits, prologue and epilogue tokens) until the
    # first sequence ends (then the loop keeps its row busy to the end of the loop)
    ended = next(k for k, t in enumerate(plain_ticks) if t.num_running < len(prompts))
    work = lambda ticks: [(t.depth_occupancy, t.exits_per_depth, t.num_prologue_tokens, t.num_epilogue_tokens)
                          for t in ticks[: ended + 1]]
    assert work(plain_ticks) == work(loop_ticks), seed
    assert len(loop_ticks) >= ended > 8


@pytest.mark.parametrize("kv_mode", ["recursion", "share_first"])
def test_cache_stage_rule_is_the_same_on_host_and_device(kv_mode):
    cfg = tiny_model("expert", kv_mode, 4).config
    stages = CacheStages(cfg)
    assert stages.num_stages == (2 if kv_mode == "share_first" else 5)
    rows = 9
    depth = torch.randint(1, 5, (rows,))
    active = torch.rand(rows) < 0.7
    position = torch.randint(0, 50, (rows,))
    lengths = torch.randint(0, 40, (rows, stages.num_stages))
    stage, entry, kv_len, writes = cache_stage_fields(depth, active, position, lengths, stages.share_first)
    for i in range(rows):
        d = int(depth[i])
        if not active[i]:
            assert (int(entry[i]), int(kv_len[i]), bool(writes[i])) == (-1, 0, False)
            continue
        assert int(stage[i]) == stages.read_stage(d)
        write = stages.write_stage(d)
        assert bool(writes[i]) == (write is not None)
        if write is not None:
            assert write == int(stage[i]) and int(entry[i]) == int(lengths[i, write])
            assert int(kv_len[i]) == int(entry[i]) + 1
        else:
            assert int(entry[i]) == -1 and int(kv_len[i]) == int(position[i]) + 1
