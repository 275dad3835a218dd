"""Prefix caching: the causality argument it rests on, exactness against caching off on random
shared-prefix workloads (both routers, both KV modes, both batching modes, chunked prefill,
preemption, aborts, the decode loop) with a page audit after every tick, overrides never
sharing blocks, prompt-logprob requests skipping the cache, LRU eviction, counters."""

from __future__ import annotations

import random

import pytest
import torch

from engine_utils import check_against_reference, run_to_completion, tiny_model
from morserve.engine import EngineArgs, LLMEngine, SamplingParams
from morserve.model import reference_forward

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(model, caching: bool, **kw) -> LLMEngine:
    args = dict(model=model, max_num_batched_tokens=40, block_size=4, num_kv_blocks=3000, max_num_seqs=8,
                enable_prefix_caching=caching)
    args.update(kw)
    return LLMEngine(model, None, EngineArgs(**args))


def prompt_entries(engine: LLMEngine, seq, upto: int) -> tuple[list[int], list[list[torch.Tensor]]]:
    """Depths of the first `upto` prompt positions and, per stage, the K/V (all layers) of their
    entries, read from the sequence's pages."""
    blocks, kv, bs = engine.blocks, engine.runner.kv, engine.blocks.block_size
    depths = seq.prompt_depths[:upto]
    out = []
    for stage in range(len(blocks.layers_per_stage)):
        count = upto if stage <= 1 else sum(d >= stage for d in depths)
        table = torch.from_numpy(blocks.block_table(seq.seq_id, stage).astype("int64"))
        idx = torch.arange(count)
        pages = table[idx // bs]                                    # [count, layers]
        out.append([torch.stack([kv.k[pages[:, l], idx % bs], kv.v[pages[:, l], idx % bs]])
                    for l in range(pages.shape[1])])
    return depths, out


@pytest.mark.parametrize("router", ["expert", "token"])
@pytest.mark.parametrize("kv_mode", ["recursion", "share_first"])
def test_causality_a_prefix_fixes_its_entries_whatever_follows(router, kv_mode):
    """The argument prefix caching rests on: routing decides each token's depth from its own causal
    state, so the tokens of a prefix take the same depths and write the same K/V entries at every
    stage whatever follows the prefix (here: two random continuations, computed in different chunk
    sizes, and the reference forward over the prefix alone). Depths must be equal; K/V equal up to
    the float32 rounding of different batch shapes (values ~10, differences ~1e-5)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = tiny_model(router, kv_mode, 3, seed=seed)
    prefix = [rng.randrange(97) for _ in range(rng.randint(20, 36))]
    seen = []
    for budget in (7, 40):
        engine = make_engine(model, True, max_num_batched_tokens=budget)    # a fresh cache each time
        tail = [rng.randrange(97) for _ in range(rng.randint(1, 12))]
        engine.add_request("r", prefix + tail, SamplingParams(max_tokens=4, **GREEDY))
        seq = engine.requests["r"].seqs[0]
        while seq.num_computed < len(prefix) + len(tail):
            engine.step()
        seen.append(prompt_entries(engine, seq, len(prefix)))
    with torch.no_grad():
        ref = reference_forward(model, torch.tensor(prefix))
    (depths_a, kv_a), (depths_b, kv_b) = seen
    assert depths_a == depths_b == ref.depths.tolist(), f"seed {seed}"
    for stage, (a, b) in enumerate(zip(kv_a, kv_b)):
        for layer, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4, msg=f"seed {seed}: stage {stage} layer {layer}")


def shared_prefix_workload(rng: random.Random, n: int, vocab: int = 97) -> dict[int, list]:
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randint(8, 30))] for _ in range(3)]
    arrivals: dict[int, list] = {}
    for i in range(n):
        prompt = rng.choice(prefixes) + [rng.randrange(vocab) for _ in range(rng.randint(0, 9))]
        params = SamplingParams(max_tokens=rng.randint(1, 8), logprobs=0, **GREEDY)
        arrivals.setdefault(rng.randrange(12), []).append((f"r{i}", prompt, params))
    return arrivals


def run_audited(engine: LLMEngine, arrivals: dict[int, list], aborts: dict[int, str]) -> dict:
    arrivals = {k: list(v) for k, v in arrivals.items()}
    finished, tick = {}, 0
    while engine.has_unfinished_requests() or arrivals:
        for args in arrivals.pop(tick, []):
            engine.add_request(*args)
        if tick in aborts:
            engine.abort_request(aborts[tick])
            engine.blocks.audit()
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.blocks.audit()
        tick += 1
        assert tick < 5000
    return finished


@pytest.mark.parametrize("router", ["expert", "token"])
@pytest.mark.parametrize("kv_mode", ["recursion", "share_first"])
def test_caching_is_exact_on_random_shared_prefix_workloads(router, kv_mode):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = tiny_model(router, kv_mode, 3, seed=seed)
    nr_stages = 4 if kv_mode == "recursion" else 2
    for engine_kw in (dict(batching="depthwise"), dict(batching="vanilla", max_num_batched_tokens=9),
                      dict(num_scheduler_steps=3),
                      dict(num_kv_blocks=30 * nr_stages, max_num_batched_tokens=24)):    # preemption
        for _ in range(4):     # the small pool: a light random workload may fit it; then draw another
            arrivals = shared_prefix_workload(rng, 14)
            ids = [rid for reqs in arrivals.values() for rid, _, _ in reqs]
            aborts = {rng.randrange(3, 30): rng.choice(ids) for _ in range(2)}
            off = run_audited(make_engine(model, False, **engine_kw), arrivals, aborts)
            engine = make_engine(model, True, **engine_kw)
            on = run_audited(engine, arrivals, aborts)
            if "num_kv_blocks" not in engine_kw or engine.scheduler.num_preemptions > 0:
                break
        stats = engine.last_tick
        assert stats.prefix_cache_hits > 0 and 0 < stats.prefix_cache_hit_rate < 1, f"seed {seed}"
        if "num_kv_blocks" in engine_kw:
            assert engine.scheduler.num_preemptions > 0, f"seed {seed}"
        assert engine.check_no_leak()
        ties = total = 0
        for reqs in arrivals.values():
            for rid, prompt, _ in reqs:
                if rid in aborts.values() or rid not in on or rid not in off:
                    continue
                a, b = off[rid].outputs[0], on[rid].outputs[0]
                total += len(b.token_ids)
                if (a.token_ids, a.depths) != (b.token_ids, b.depths):   # only a numerical near-tie may differ
                    ties += 1 + check_against_reference(model, prompt, b.token_ids, b.depths)
                    continue
                lp_a = [next(iter(x.values())) for x in a.logprobs]
                lp_b = [next(iter(x.values())) for x in b.logprobs]
                assert lp_a == pytest.approx(lp_b, abs=1e-4), f"seed {seed} {rid}"
        assert ties <= max(1, total // 100), f"seed {seed}: {ties} near-tie differences in {total} tokens"


def test_different_overrides_never_share_a_block():
    model = tiny_model("expert", "recursion", 3, seed=2)
    engine = make_engine(model, True)
    prompt = list(range(1, 33))
    variants = [dict(), dict(max_depth=2), dict(max_depth=1), dict(router_threshold=0.3),
                dict(router_threshold=0.3, max_depth=2)]
    for i, over in enumerate(variants):
        run_to_completion(engine, {0: [(f"v{i}", prompt, SamplingParams(max_tokens=2, **GREEDY, **over))]})
        assert engine.last_tick.prefix_cache_hits == 0, f"{over} shared a block with an earlier override"
    keys = list(engine.blocks.prefix.blocks)
    assert len(keys) == len(set(keys))
    cached = len(engine.blocks.prefix.blocks)
    for i, over in enumerate(variants):          # the same overrides again: every one hits its own blocks
        before = engine.last_tick.prefix_cache_hits
        out = run_to_completion(engine, {0: [(f"w{i}", prompt, SamplingParams(max_tokens=2, **GREEDY, **over))]})
        assert engine.last_tick.prefix_cache_hits - before >= 16, over
        check_against_reference(model, prompt, out[f"w{i}"].outputs[0].token_ids, out[f"w{i}"].outputs[0].depths,
                                over.get("max_depth"), over.get("router_threshold"))
    assert len(engine.blocks.prefix.blocks) == cached
    engine.blocks.audit()


def test_prompt_logprob_requests_skip_the_cache():
    model = tiny_model("token", "recursion", 3, seed=4)
    prompt = list(range(5, 40))
    want = SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY)
    plain = run_to_completion(make_engine(model, False), {0: [("p", prompt, want)]})["p"]
    engine = make_engine(model, True)
    run_to_completion(engine, {0: [("warm", prompt, SamplingParams(max_tokens=2, **GREEDY))]})
    queries = engine.last_tick.prefix_cache_queries
    got = run_to_completion(engine, {0: [("p", prompt, want)]})["p"]
    assert engine.last_tick.prefix_cache_queries == queries      # not looked up
    assert len(got.prompt_logprobs) == len(prompt)
    for a, b in zip(plain.prompt_logprobs[1:], got.prompt_logprobs[1:]):
        assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
    assert got.outputs[0].token_ids == plain.outputs[0].token_ids


def test_lru_evicts_unreferenced_blocks_oldest_first():
    model = tiny_model("expert", "recursion", 3, seed=6)
    engine = make_engine(model, True, num_kv_blocks=160)
    rng = random.Random(0)
    prompts = [[rng.randrange(97) for _ in range(24)] for _ in range(8)]
    for i, prompt in enumerate(prompts):
        run_to_completion(engine, {0: [(f"a{i}", prompt, SamplingParams(max_tokens=2, **GREEDY))]})
        engine.blocks.audit()
    assert engine.blocks.num_free_pages == engine.blocks.num_pages       # cached pages count as free
    assert engine.blocks.prefix.lru and len(engine.blocks.free_pages) < engine.blocks.num_pages
    hits = engine.last_tick.prefix_cache_hits
    run_to_completion(engine, {0: [("new", prompts[-1], SamplingParams(max_tokens=2, **GREEDY))]})
    assert engine.last_tick.prefix_cache_hits > hits                       # the newest survived
    hits = engine.last_tick.prefix_cache_hits
    run_to_completion(engine, {0: [("old", prompts[0], SamplingParams(max_tokens=2, **GREEDY))]})
    assert engine.last_tick.prefix_cache_hits == hits                      # the oldest was evicted
    engine.blocks.audit()
    assert engine.check_no_leak()


@pytest.mark.parametrize("router", ["expert", "token"])
def test_a_hit_covers_the_common_prefix_at_every_depth(router):
    """Compact stages end inside blocks at a prefix boundary; tails make the hit reach the last
    stage-0 boundary inside the common prefix anyway, and the outputs stay exact."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = tiny_model(router, "recursion", 3, seed=seed)
    prefix = [rng.randrange(97) for _ in range(rng.randint(30, 60))]
    engine = make_engine(model, True)
    # the tails start with three different tokens: the prompts share exactly `prefix`
    prompts = [prefix + [first] + [rng.randrange(97) for _ in range(rng.randint(0, 8))]
               for first in rng.sample(range(97), 3)]
    for i, prompt in enumerate(prompts):
        before = engine.last_tick.prefix_cache_hits
        out = run_to_completion(engine, {0: [(f"r{i}", prompt, SamplingParams(max_tokens=4, **GREEDY))]})[f"r{i}"]
        if i:
            assert engine.last_tick.prefix_cache_hits - before == len(prefix) // 4 * 4, f"seed {seed}"
        check_against_reference(model, prompt, out.outputs[0].token_ids, out.outputs[0].depths)
        engine.blocks.audit()
    assert engine.blocks.prefix.tails, "no compact stage ended inside a block"


def test_cache_salt_keeps_requests_apart():
    """vLLM's cache_salt: requests share cached blocks only with requests of the same salt (or,
    unsalted, with other unsalted ones), and a salted hit is as exact as any other."""
    model = tiny_model("expert", "recursion", 3, seed=3)
    engine = make_engine(model, True)
    prompt = list(range(5, 37))
    for i, salt in enumerate([None, "tenant-a", "tenant-b"]):
        run_to_completion(engine, {0: [(f"s{i}", prompt, SamplingParams(max_tokens=2, cache_salt=salt, **GREEDY))]})
        assert engine.last_tick.prefix_cache_hits == 0, f"salt {salt!r} shared a block with another salt"
    for i, salt in enumerate([None, "tenant-a", "tenant-b"]):
        before = engine.last_tick.prefix_cache_hits
        out = run_to_completion(engine, {0: [(f"t{i}", prompt, SamplingParams(max_tokens=2, cache_salt=salt,
                                                                               **GREEDY))]})
        assert engine.last_tick.prefix_cache_hits - before >= 16, salt
        check_against_reference(model, prompt, out[f"t{i}"].outputs[0].token_ids, out[f"t{i}"].outputs[0].depths,
                                None, None)
    engine.blocks.audit()
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="").validate()
