"""Engine vs the dense reference forward: greedy tokens and depths for random request mixes,
both batching modes, both routers, both KV modes, Nr 1-4, preemption; seeded sampling
independent of batch composition; no KV leaks; mixed-depth ticks; input validation."""

from __future__ import annotations

import random

import pytest
import torch

from engine_utils import check_against_reference, run_to_completion, tiny_model
from morserve.engine import EngineArgs, LLMEngine, SamplingParams
from morserve.engine.cuda_graphs import GraphedBlockPass, graph_sizes

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(model, **kw) -> LLMEngine:
    args = dict(model=model, max_num_batched_tokens=64, block_size=4, num_kv_blocks=2000, max_num_seqs=16)
    args.update(kw)
    return LLMEngine(model, None, EngineArgs(**args))


def random_workload(rng: random.Random, vocab: int, n: int, max_prompt: int = 40, spread: int = 6,
                    min_prompt: int = 1):
    arrivals: dict[int, list] = {}
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(min_prompt, max_prompt))]
        params = SamplingParams(max_tokens=rng.randint(1, 14), **GREEDY)
        arrivals.setdefault(rng.randrange(spread), []).append((f"r{i}", prompt, params))
    return arrivals


def assert_matches_reference(model, arrivals, results) -> None:
    ties = total = 0
    for reqs in arrivals.values():
        for rid, prompt, params in reqs:
            out = results[rid].outputs[0]
            assert len(out.token_ids) == params.max_tokens
            ties += check_against_reference(model, prompt, out.token_ids, out.depths)
            total += len(out.token_ids)
    assert ties <= max(1, total // 100), f"{ties} near-tie differences in {total} tokens"


@pytest.mark.parametrize("batching", ["depthwise", "vanilla"])
@pytest.mark.parametrize("router", ["expert", "token"])
@pytest.mark.parametrize("kv_mode", ["recursion", "share_first"])
@pytest.mark.parametrize("nr", [1, 2, 3, 4])
def test_greedy_matches_reference(batching, router, kv_mode, nr):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = tiny_model(router, kv_mode, nr, seed=seed)
    engine = make_engine(model, batching=batching)
    arrivals = random_workload(rng, model.config.vocab_size, n=6)
    results = run_to_completion(engine, {k: list(v) for k, v in arrivals.items()})
    assert_matches_reference(model, arrivals, results)
    assert engine.check_no_leak()


@pytest.mark.parametrize("batching", ["depthwise", "vanilla"])
@pytest.mark.parametrize("kv_mode", ["recursion", "share_first"])
def test_preemption_keeps_tokens_exact(batching, kv_mode):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = tiny_model("expert", kv_mode, 3, seed=seed)
    # One 50-token sequence at its worst case needs 13 blocks x 8 layers (recursion-wise: stage 0
    # has 2 layers, each of 3 depths 2) or x 4 (share-first): the pool holds one such, not 8.
    pages = 110 if kv_mode == "recursion" else 56
    engine = make_engine(model, batching=batching, num_kv_blocks=pages, max_num_batched_tokens=48)
    arrivals = random_workload(rng, model.config.vocab_size, n=8, max_prompt=36, spread=3, min_prompt=24)
    results = run_to_completion(engine, {k: list(v) for k, v in arrivals.items()})
    assert engine.scheduler.num_preemptions > 0, f"seed {seed}"
    assert_matches_reference(model, arrivals, results)
    assert engine.check_no_leak()


def test_vanilla_model_both_modes_identical():
    """Nr = 1 without router is a plain Llama: both modes are plain continuous batching."""
    model = tiny_model(None, "recursion", 1, seed=3)
    rng = random.Random(7)
    arrivals = random_workload(rng, model.config.vocab_size, n=5)
    outs = [run_to_completion(make_engine(model, batching=b), {k: list(v) for k, v in arrivals.items()})
            for b in ("depthwise", "vanilla")]
    for rid in outs[0]:
        assert outs[0][rid].outputs[0].token_ids == outs[1][rid].outputs[0].token_ids
        assert set(outs[0][rid].outputs[0].depths) == {1}
    assert_matches_reference(model, arrivals, outs[0])


def test_block_batch_holds_several_depths():
    model = tiny_model("expert", "recursion", 3, seed=11)
    engine = make_engine(model)
    rng = random.Random(1)
    for i in range(8):
        engine.add_request(f"r{i}", [rng.randrange(97) for _ in range(rng.randint(2, 8))],
                           SamplingParams(max_tokens=16, **GREEDY))
    mixed = 0
    while engine.has_unfinished_requests():
        engine.step()
        occupied = [d for d, n in enumerate(engine.last_tick.depth_occupancy, 1) if n]
        mixed += len(occupied) >= 2
        assert engine.last_tick.num_block_steps <= 1
    assert mixed >= 5, "depth-wise ticks never mixed depths"
    assert sum(engine.total_depth_token_ticks[1:]) > 0
    assert engine.check_no_leak()
    idle = engine.last_tick            # falling idle publishes a zero-work snapshot for the gauges
    assert idle.num_block_tokens == 0 and idle.num_running == 0 and idle.kv_usage == 0


def test_vanilla_mode_runs_depths_in_order_within_a_tick():
    model = tiny_model("expert", "recursion", 3, seed=12)
    engine = make_engine(model, batching="vanilla")
    for i in range(4):
        engine.add_request(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=8, **GREEDY))
    steps = []
    while engine.has_unfinished_requests():
        engine.step()
        steps.append(engine.last_tick.num_block_steps)
    assert max(steps) >= 2   # a decode step ran several recursions in one tick


@pytest.mark.parametrize("batching", ["depthwise", "vanilla"])
def test_seeded_sampling_independent_of_batch(batching):
    model = tiny_model("expert", "recursion", 3, seed=5)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=1234, max_tokens=12, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    alone = make_engine(model, batching=batching)
    alone_out = run_to_completion(alone, {0: [("target", prompt, params)]})["target"].outputs[0].token_ids
    crowd = make_engine(model, batching=batching, max_num_seqs=32, max_num_batched_tokens=256, num_kv_blocks=6000)
    rng = random.Random(9)
    arrivals = {t: [(f"o{t}-{i}", [rng.randrange(97) for _ in range(rng.randint(1, 20))],
                     SamplingParams(temperature=1.0, max_tokens=rng.randint(1, 12), ignore_eos=True))
                    for i in range(10)] for t in range(3)}
    arrivals[1].append(("target", prompt, params))
    crowd_out = run_to_completion(crowd, arrivals)
    assert len(crowd_out) == 31
    assert crowd_out["target"].outputs[0].token_ids == alone_out
    assert crowd.check_no_leak()


def test_seeded_n_samples_differ_and_reproduce():
    model = tiny_model("token", "recursion", 2, seed=6)
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=10, ignore_eos=True)
    a = run_to_completion(make_engine(model), {0: [("a", [1, 2, 3], params)]})["a"]
    b = run_to_completion(make_engine(model), {0: [("a", [1, 2, 3], params)]})["a"]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_abort_frees_everything():
    model = tiny_model("expert", "recursion", 3, seed=8)
    engine = make_engine(model)
    for i in range(6):
        engine.add_request(f"r{i}", list(range(1, 30)), SamplingParams(max_tokens=20, **GREEDY))
    for _ in range(5):
        engine.step()
    assert not engine.blocks.all_free()
    for i in range(6):
        engine.abort_request(f"r{i}")
    assert engine.check_no_leak()
    engine.abort_request("unknown")      # no-op
    # the engine keeps serving correctly after aborts
    res = run_to_completion(engine, {0: [("after", [4, 5, 6], SamplingParams(max_tokens=6, **GREEDY))]})
    out = res["after"].outputs[0]
    check_against_reference(model, [4, 5, 6], out.token_ids, out.depths)
    assert engine.check_no_leak()


def test_stop_token_ids_eos_and_min_tokens():
    model = tiny_model("expert", "recursion", 2, seed=4)
    engine = make_engine(model)
    free_run = run_to_completion(engine, {0: [("a", [3, 4], SamplingParams(max_tokens=10, **GREEDY))]})
    toks = free_run["a"].outputs[0].token_ids
    stop_tok = toks[4]
    first = toks.index(stop_tok)
    res = run_to_completion(engine, {0: [("b", [3, 4], SamplingParams(max_tokens=10, temperature=0,
                                                                          stop_token_ids=[stop_tok]))]})
    out = res["b"].outputs[0]
    assert out.token_ids == toks[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    # min_tokens bans the stop token until enough tokens were generated
    res = run_to_completion(engine, {0: [("c", [3, 4], SamplingParams(max_tokens=10, temperature=0,
                                                                          stop_token_ids=[stop_tok], min_tokens=8))]})
    out = res["c"].outputs[0]
    assert stop_tok not in out.token_ids[:8]
    assert free_run["a"].outputs[0].finish_reason == "length"
    assert engine.check_no_leak()


def test_logprobs_and_prompt_logprobs_match_reference():
    from morserve.model import reference_forward
    model = tiny_model("expert", "recursion", 3, seed=10)
    engine = make_engine(model, max_num_batched_tokens=8)        # forces chunked prefill
    prompt = list(range(10, 31))
    params = SamplingParams(max_tokens=5, logprobs=3, prompt_logprobs=2, **GREEDY)
    out = run_to_completion(engine, {0: [("a", prompt, params)]})["a"]
    comp = out.outputs[0]
    with torch.no_grad():
        ref = reference_forward(model, torch.tensor(prompt + comp.token_ids))
    lp = torch.log_softmax(ref.logits.float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[prompt[pos]] - float(lp[pos - 1, prompt[pos]])) < 1e-4
        assert len(entry) in (2, 3)
    for i, tok in enumerate(comp.token_ids):
        entry = comp.logprobs[i]
        assert abs(entry[tok] - float(lp[len(prompt) - 1 + i, tok])) < 1e-4
        assert set(lp[len(prompt) - 1 + i].topk(3).indices.tolist()) <= set(entry)
    assert abs(comp.cumulative_logprob - sum(comp.logprobs[i][t] for i, t in enumerate(comp.token_ids))) < 1e-4


def test_invalid_input_is_rejected_without_side_effects():
    model = tiny_model("expert", "recursion", 2, seed=2)
    engine = make_engine(model, max_model_len=64)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("a", [1, 2, 500])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [])
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        engine.add_request("a", [1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("a", "hello")
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(n=0), dict(top_k=-5),
                dict(logprobs=100), dict(min_tokens=5, max_tokens=2), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert engine.check_no_leak() and not engine.has_unfinished_requests()
    engine.add_request("ok", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [1, 2])
    run_to_completion(engine)
    assert engine.check_no_leak()


def test_engine_args_validation():
    model = tiny_model("expert", "recursion", 2)
    for bad in (dict(batching="sideways"), dict(block_size=0), dict(max_num_seqs=0), dict(dtype="int7")):
        with pytest.raises(ValueError):
            args = EngineArgs(model=model, **bad)
            args.validate()
            args.resolve_dtype(torch.device("cpu"))


class ByteTokenizer:
    """Minimal duck-typed tokenizer (token id = byte value) so stop strings can be tested here."""

    eos_token_ids: list[int] = []
    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_stop_strings_truncate_text():
    model = tiny_model("expert", "recursion", 2, seed=13, vocab=256)
    engine = LLMEngine(model, ByteTokenizer(), EngineArgs(model=model, block_size=4, num_kv_blocks=2000))
    free = run_to_completion(engine, {0: [("free", "hello", SamplingParams(max_tokens=24, **GREEDY))]})
    text = free["free"].outputs[0].text
    ids = free["free"].outputs[0].token_ids
    # pick a stop string from the middle of the free-running text
    cut = next(i for i in range(3, len(ids)) if ids[i] < 128 and ids[i + 1] < 128)
    stop = bytes(ids[cut: cut + 2]).decode()
    at = text.find(stop)
    for include in (False, True):
        params = SamplingParams(max_tokens=24, temperature=0, stop=[stop, "\x00never"], include_stop_str_in_output=include)
        out = run_to_completion(engine, {0: [("s", "hello", params)]})["s"].outputs[0]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.text == (text[: at + len(stop)] if include else text[:at])
        assert out.token_ids == ids[: len(out.token_ids)]
    assert engine.check_no_leak()


def test_incomplete_utf8_is_held_back_while_streaming():
    model = tiny_model("expert", "recursion", 2, seed=int(torch.randint(0, 1 << 30, (1,))), vocab=256)
    engine = LLMEngine(model, ByteTokenizer(), EngineArgs(model=model, block_size=4, num_kv_blocks=2000))
    texts = []
    engine.add_request("a", "x", SamplingParams(max_tokens=30, **GREEDY))
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
    for t in texts[:-1]:
        assert not t.endswith("\ufffd")
        assert texts[-1].startswith(t)


@pytest.mark.parametrize("router", ["expert", "token", None])
@pytest.mark.parametrize("kv_mode", ["recursion", "share_first"])
def test_padded_static_block_pass_matches_reference(router, kv_mode, monkeypatch):
    """The CUDA-graph path's static padded buffers, run eagerly: padding rows must be inert and
    ticks too big for the largest size must fall back to the plain pass."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = tiny_model(router, kv_mode, 3, seed=seed)
    engine = make_engine(model, max_model_len=128)
    engine.runner.use_graphs(graph_sizes(24), engine.max_model_len, capture=False)
    padded_calls = []
    run_padded = GraphedBlockPass.__call__
    monkeypatch.setattr(GraphedBlockPass, "__call__",
                        lambda self, meta, tables: padded_calls.append(meta.shape[1]) or run_padded(self, meta, tables))
    arrivals = random_workload(rng, model.config.vocab_size, n=8)
    results = run_to_completion(engine, {k: list(v) for k, v in arrivals.items()})
    assert_matches_reference(model, arrivals, results)
    assert engine.check_no_leak()
    assert any(t not in engine.runner.graphed.sizes for t in padded_calls), "padding was never exercised"


def test_graph_sizes_cover_every_count_with_bounded_padding():
    sizes = graph_sizes(512)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 512
    for t in range(1, 513):
        padded = next(s for s in sizes if s >= t)
        assert padded - t <= max(7, t // 7)
    assert graph_sizes(20)[-1] == 20 and graph_sizes(0) == []


def test_extreme_sampling_inputs_do_not_break_the_engine():
    """A seed beyond 64 bits, a 1e-38 repetition penalty and a tiny temperature run beside
    ordinary greedy requests, which still match the reference."""
    model = tiny_model("expert", "recursion", 2, seed=12)
    engine = make_engine(model)
    odd = [("huge-seed", SamplingParams(max_tokens=6, seed=2**70 + 3, temperature=1.0)),
           ("tiny-penalty", SamplingParams(max_tokens=6, repetition_penalty=1e-38, temperature=0.8)),
           ("tiny-temp", SamplingParams(max_tokens=6, temperature=1e-4, top_p=0.5))]
    plain = [(f"g{i}", [i + 1, i + 2, i + 3], SamplingParams(max_tokens=8, **GREEDY)) for i in range(3)]
    res = run_to_completion(engine, {0: [(rid, [5, 6, 7], p) for rid, p in odd] + plain})
    for rid, _ in odd:
        out = res[rid].outputs[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 6
    for rid, prompt, _ in plain:
        out = res[rid].outputs[0]
        check_against_reference(model, prompt, out.token_ids, out.depths)
    again = run_to_completion(engine, {0: [("again", [5, 6, 7], odd[0][1])]})["again"]
    assert again.outputs[0].token_ids == res["huge-seed"].outputs[0].token_ids
    assert engine.check_no_leak()


def test_min_tokens_that_would_ban_every_token_is_rejected():
    model = tiny_model("expert", "recursion", 2, vocab=20)
    engine = make_engine(model)
    with pytest.raises(ValueError, match="ban every token"):
        engine.add_request("a", [1, 2], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=list(range(20))))
    assert engine.check_no_leak() and not engine.has_unfinished_requests()
    # out-of-vocabulary stop ids can never be generated: accepted and harmless
    out = run_to_completion(engine, {0: [("b", [1, 2], SamplingParams(max_tokens=4, min_tokens=2, temperature=0,
                                                                       stop_token_ids=[5000]))]})["b"]
    assert len(out.outputs[0].token_ids) == 4


def test_abort_publishes_fresh_stats_without_a_tick():
    model = tiny_model("expert", "recursion", 2, seed=3)
    engine = make_engine(model)
    seen = []
    engine.tick_listeners.append(seen.append)
    engine.add_request("a", list(range(1, 20)), SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    assert seen[-1].num_running == 1 and seen[-1].kv_usage > 0
    engine.abort_request("a")
    assert seen[-1].num_running == 0 and seen[-1].kv_usage == 0 and seen[-1].num_block_tokens == 0


@pytest.mark.parametrize("batching", ["depthwise", "vanilla"])
@pytest.mark.parametrize("router, kv_mode, nr", [("expert", "recursion", 3), ("token", "share_first", 3),
                                                 ("token", "recursion", 4), ("expert", "share_first", 4),
                                                 (None, "recursion", 1)])
def test_multi_step_decode_loop_matches_reference(batching, router, kv_mode, nr):
    """num_scheduler_steps > 1: greedy decoding runs several ticks per step() with the state on the
    device; tokens and depths must still be the reference's, stop tokens must cut the burst, and
    the loop must hand the state back so that later ordinary ticks continue correctly."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = tiny_model(router, kv_mode, nr, seed=seed)
    engine = make_engine(model, batching=batching, num_scheduler_steps=5)
    arrivals = random_workload(rng, model.config.vocab_size, n=8, spread=12)
    results = run_to_completion(engine, {k: list(v) for k, v in arrivals.items()})
    assert_matches_reference(model, arrivals, results)
    assert engine.check_no_leak()
    looped = make_engine(model, batching=batching, num_scheduler_steps=5)
    calls = 0
    for rid, prompt, params in [r for reqs in arrivals.values() for r in reqs]:
        looped.add_request(rid, prompt, SamplingParams(max_tokens=14, **GREEDY))
    published = []
    looped.tick_listeners.append(published.append)
    while looped.has_unfinished_requests():
        looped.step()
        calls += 1
    assert len(published) > calls, "the decode loop never ran several ticks in one step()"
    assert looped.check_no_leak()


def test_multi_step_decode_loop_honours_stops_and_falls_back():
    model = tiny_model("expert", "recursion", 3, seed=21)
    plain = run_to_completion(make_engine(model), {0: [("a", [5, 6, 7], SamplingParams(max_tokens=12, **GREEDY))]})
    toks = plain["a"].outputs[0].token_ids
    engine = make_engine(model, num_scheduler_steps=8)
    stop = toks[5]
    reqs = [("stop", [5, 6, 7], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop])),
            ("len", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY)),
            ("lp", [5, 6, 7], SamplingParams(max_tokens=12, logprobs=0, **GREEDY))]
    res = run_to_completion(engine, {0: reqs})
    assert res["stop"].outputs[0].token_ids == toks[: toks.index(stop) + 1]
    assert res["stop"].outputs[0].finish_reason == "stop"
    assert res["len"].outputs[0].token_ids == toks[:3]
    lp = res["lp"].outputs[0]
    assert lp.token_ids == toks and [list(e) for e in lp.logprobs] == [[t] for t in toks]
    assert abs(lp.cumulative_logprob - plain["a"].outputs[0].cumulative_logprob) < 1e-4
    # sampling requests never enter the loop, and mixing them in keeps everything exact
    mixed = run_to_completion(engine, {0: [("g", [5, 6, 7], SamplingParams(max_tokens=12, **GREEDY)),
                                           ("s", [1, 2], SamplingParams(max_tokens=12, temperature=1.0, seed=3))]})
    assert mixed["g"].outputs[0].token_ids == toks
    assert engine.check_no_leak()


def test_final_only_requests_report_once_and_bad_output_kind_is_rejected():
    model = tiny_model("expert", "recursion", 2, seed=5)
    engine = make_engine(model)
    engine.add_request("f", [1, 2, 3], SamplingParams(max_tokens=6, output_kind="final_only", **GREEDY))
    engine.add_request("c", [1, 2, 3], SamplingParams(max_tokens=6, **GREEDY))
    seen = {"f": [], "c": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["f"]) == 1 and seen["f"][0].finished
    assert len(seen["c"]) == 6 and seen["c"][-1].outputs[0].token_ids == seen["f"][0].outputs[0].token_ids
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")


def test_multi_step_loop_with_more_sequences_than_pool_rows():
    """max_num_seqs above max_num_batched_tokens: the loop needs a pool row per sequence, so it
    must wait for enough free rows rather than fail, and the results stay exact."""
    rng = random.Random(7)
    model = tiny_model("expert", "recursion", 3, seed=7)
    engine = make_engine(model, max_num_batched_tokens=6, max_num_seqs=12, num_scheduler_steps=4)
    arrivals = {0: [(f"r{i}", [rng.randrange(97) for _ in range(rng.randint(1, 5))],
                     SamplingParams(max_tokens=10, **GREEDY)) for i in range(12)]}
    results = run_to_completion(engine, {k: list(v) for k, v in arrivals.items()})
    assert_matches_reference(model, arrivals, results)
    assert engine.check_no_leak()


def test_chained_decode_loops_survive_aborts_and_arrivals():
    """With nothing in the way the engine launches the next loop before handling the last one's
    tokens (a loop stays in flight between step() calls). Aborting a sequence of the loop in flight,
    or a new arrival, ends the chain; the other sequences stay exact and nothing leaks."""
    rng = random.Random(11)
    model = tiny_model("expert", "recursion", 3, seed=11)
    engine = make_engine(model, num_scheduler_steps=3, max_num_seqs=4)
    prompts = {f"r{i}": [rng.randrange(97) for _ in range(rng.randint(2, 9))] for i in range(4)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=30, **GREEDY))
    results, chained_steps, aborted, late = {}, 0, False, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
        if engine._flight is not None:
            chained_steps += 1
            if not aborted and chained_steps >= 2:
                engine.abort_request("r1")           # its row is still running on the device
                aborted = True
            elif aborted and late is None:
                late = [5, 4, 3]
                engine.add_request("late", late, SamplingParams(max_tokens=6, **GREEDY))
    assert chained_steps >= 3 and aborted and late is not None
    assert "r1" not in results
    for rid, prompt in {**prompts, "late": late}.items():
        if rid != "r1":
            out = results[rid].outputs[0]
            check_against_reference(model, prompt, out.token_ids, out.depths)
    assert engine.check_no_leak()
    # aborting everything while a loop is in flight leaves nothing behind at once
    for rid in ("x", "y"):
        engine.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=40, **GREEDY))
    while engine._flight is None:
        engine.step()
    engine.abort_request("x")
    engine.abort_request("y")
    assert engine.check_no_leak()


def test_decode_loop_samples_the_per_tick_engines_tokens():
    """Temperature sampling inside the device loop uses the sampler's own counter-based draws:
    seeded requests get exactly the tokens of the one-tick engine."""
    model = tiny_model("expert", "recursion", 3, seed=13, std=0.15)   # flatter logits: real draws
    requests = [(f"s{i}", [2 + i, 7, 1], SamplingParams(max_tokens=20, temperature=0.9, seed=40 + i,
                                                        ignore_eos=True)) for i in range(5)]
    requests.append(("g", [3, 3, 3], SamplingParams(max_tokens=20, **GREEDY)))
    plain = run_to_completion(make_engine(model), {0: list(requests)})
    engine = make_engine(model, num_scheduler_steps=4)
    launches, launch = [], engine.decode_loop.launch
    engine.decode_loop.launch = lambda *a: launches.append(engine.decode_loop.sampling) or launch(*a)
    looped = run_to_completion(engine, {0: list(requests)})
    assert launches and all(launches), "the loop never sampled"
    for rid, _, _ in requests:
        assert looped[rid].outputs[0].token_ids == plain[rid].outputs[0].token_ids, rid
    greedy = run_to_completion(make_engine(model), {0: [("g0", [2, 7, 1], SamplingParams(max_tokens=20, **GREEDY))]})
    assert looped["s0"].outputs[0].token_ids != greedy["g0"].outputs[0].token_ids, "no real draw happened"
    assert engine.check_no_leak()
