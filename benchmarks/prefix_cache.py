"""Shared-system-prompt workload with and without prefix caching, side by side in one run.

N requests share one common prefix (a system prompt) and differ in a random suffix; they arrive
at once (t = 0) at an engine that has served the system prompt once before (one warm-up request
with the prefix alone, in both modes, not timed). Reported per mode: TTFT p50 / p90 (arrival to
first token), throughput (output tokens and requests per second over the whole run), the prefix
cache's hit rate (prompt tokens found cached / looked up), and whether the outputs of the two
modes agree (greedy tokens and depths). Modes run interleaved, `--repeats` times each; the table
shows medians.

The default model has 256 positions; a workload longer than that (the default 512 + 64 + 16)
runs with max_position_embeddings raised (RoPE has no learned positions): the text beyond 256
positions is meaningless, but the compute, and so the timing, is that of a model of that length.

    python benchmarks/prefix_cache.py                          # 64 x (512 + 64) tokens, CPU
    python benchmarks/prefix_cache.py --prefix-len 160 --suffix-len 32 --output-len 16   # within 256
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == _REPO / "benchmarks":  # benchmarks/kernels.py would shadow kernels
    sys.path[0] = str(_REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from morserve.checkpoint import load_pretrained  # noqa: E402
from morserve.engine import EngineArgs, LLMEngine, SamplingParams  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(_REPO / "models" / "morserve-mini-mor3"))
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs of each mode (interleaved)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def workload(args: argparse.Namespace, vocab: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(args.seed)
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_len)]
    return prefix, [prefix + [rng.randrange(vocab) for _ in range(args.suffix_len)] for _ in range(args.num_requests)]


def run_mode(model, args: argparse.Namespace, caching: bool, prefix: list[int], prompts: list[list[int]]) -> dict:
    total = args.prefix_len + args.suffix_len + args.output_len
    engine = LLMEngine(model, None, EngineArgs(
        model=model, device="cpu", block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs, max_model_len=total, enable_prefix_caching=caching))
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True, output_kind="cumulative")
    engine.add_request("warmup", prefix, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    base_queries, base_hits = engine.last_tick.prefix_cache_queries, engine.last_tick.prefix_cache_hits
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    first: dict[str, float] = {}
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now - start
            if out.finished:
                outputs[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].depths)
    wall = time.perf_counter() - start
    ttft = sorted(first.values())
    queries = engine.last_tick.prefix_cache_queries - base_queries
    hits = engine.last_tick.prefix_cache_hits - base_hits
    assert engine.check_no_leak()
    return dict(caching=caching, ttft_p50_s=statistics.median(ttft), ttft_p90_s=ttft[int(0.9 * (len(ttft) - 1))],
                wall_s=wall, output_tok_s=len(prompts) * args.output_len / wall, req_s=len(prompts) / wall,
                hit_rate=hits / queries if queries else 0.0, outputs=outputs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model, device="cpu", dtype=torch.float32).model.eval()
    total = args.prefix_len + args.suffix_len + args.output_len
    if total > model.config.max_position_embeddings:
        print(f"note: {total} positions > the model's {model.config.max_position_embeddings}: "
              "raised for timing (text beyond is meaningless)")
        model.config.max_position_embeddings = total
    prefix, prompts = workload(args, model.config.vocab_size)
    runs = {False: [], True: []}
    for _ in range(args.repeats):
        for caching in (False, True):
            row = run_mode(model, args, caching, prefix, prompts)
            runs[caching].append(row)
            print(f"caching={caching}: TTFT p50 {row['ttft_p50_s']:.3f} s, {row['output_tok_s']:.1f} out tok/s, "
                  f"hit rate {row['hit_rate']:.3f}, wall {row['wall_s']:.2f} s", flush=True)
    same = all(r["outputs"] == runs[False][0]["outputs"] for rows in runs.values() for r in rows)
    med = {c: {k: statistics.median(r[k] for r in rows) for k in ("ttft_p50_s", "ttft_p90_s", "output_tok_s",
                                                                   "req_s", "hit_rate", "wall_s")}
           for c, rows in runs.items()}
    print(f"\n{args.num_requests} requests, {args.prefix_len}-token common prefix, {args.suffix_len}-token "
          f"suffixes, {args.output_len} output tokens, block {args.block_size}, {args.threads} thread(s), "
          f"median of {args.repeats}\n")
    print("| prefix caching | TTFT p50 (s) | TTFT p90 (s) | output tok/s | req/s | hit rate |")
    print("|---|---:|---:|---:|---:|---:|")
    for caching in (False, True):
        m = med[caching]
        print(f"| {'on' if caching else 'off'} | {m['ttft_p50_s']:.3f} | {m['ttft_p90_s']:.3f} | "
              f"{m['output_tok_s']:.1f} | {m['req_s']:.2f} | {m['hit_rate']:.3f} |")
    ratio = med[True]["ttft_p50_s"] / med[False]["ttft_p50_s"]
    speed = med[True]["output_tok_s"] / med[False]["output_tok_s"]
    print(f"\nTTFT p50 on/off = {ratio:.3f} (target <= 0.333), throughput on/off = {speed:.2f}x (target > 1); "
          f"outputs identical in every run: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), median=med, ttft_ratio=ratio,
                                                   throughput_ratio=speed, identical=same), indent=1))


if __name__ == "__main__":
    main()
