"""The load-adaptive depth policy under a load test: fixed vs adaptive, side by side in one run.

Requests arrive as a Poisson process (`--rate` per second, above what the engine sustains at full
depth, so a queue builds up); a fraction (`--opt-in`) sets allow_depth_reduction. The adaptive
policy watches the head-of-queue wait (`--metric queue_time`, target `--target` seconds) or the
KV usage. Reported per mode: output tokens/s over the run, TTFT p50 / p90, the mean depth of the
opted-in and the other requests' tokens, the share of ticks at each cap, and whether the outputs
of the requests that did not opt in are identical in both modes (they must be). Modes run
interleaved, `--repeats` times each; the arrival times are the same in every run.

    python benchmarks/depth_policy.py                       # default model, CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == _REPO / "benchmarks":  # benchmarks/kernels.py would shadow kernels
    sys.path[0] = str(_REPO)

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import torch  # noqa: E402

from morserve.checkpoint import load_pretrained  # noqa: E402
from morserve.engine import EngineArgs, LLMEngine, SamplingParams  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(_REPO / "models" / "morserve-mini-mor3"))
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=8.0, help="arrivals per second (Poisson)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--opt-in", type=float, default=0.5, help="fraction of requests with allow_depth_reduction")
    p.add_argument("--metric", choices=["queue_time", "kv_usage"], default="queue_time")
    p.add_argument("--target", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_mode(model, args: argparse.Namespace, policy: str, requests: list[tuple[float, list[int], bool]]) -> dict:
    engine = LLMEngine(model, None, EngineArgs(
        model=model, device="cpu", max_num_seqs=args.max_num_seqs, depth_policy=policy,
        depth_policy_metric=args.metric, depth_policy_target=args.target))
    caps = Counter()
    engine.tick_listeners.append(lambda stats: caps.update([stats.depth_cap]))
    pending = list(enumerate(requests))
    first, outputs, arrived = {}, {}, {}
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0][1][0] <= now:
            i, (at, prompt, opt) = pending.pop(0)
            arrived[f"r{i}"] = at
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=args.output_len, temperature=0.0,
                                                               ignore_eos=True, allow_depth_reduction=opt))
        if not engine.has_unfinished_requests():
            time.sleep(min(0.01, max(0.0, pending[0][1][0] - now)))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = t - arrived[out.request_id]
            if out.finished:
                outputs[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].depths)
    wall = time.perf_counter() - start
    ttft = sorted(first.values())
    opted = {f"r{i}" for i, (_, _, opt) in enumerate(requests) if opt}

    def mean_depth(ids) -> float:
        depths = [d for rid in ids for d in outputs[rid][1]]
        return sum(depths) / len(depths) if depths else float("nan")

    ticks = sum(caps.values())
    return dict(policy=policy, wall_s=wall, tok_s=len(requests) * args.output_len / wall,
                ttft_p50=statistics.median(ttft), ttft_p90=ttft[int(0.9 * (len(ttft) - 1))],
                depth_opted=mean_depth(opted), depth_other=mean_depth(set(outputs) - opted),
                cap_share={c: n / ticks for c, n in sorted(caps.items())},
                others={rid: out for rid, out in outputs.items() if rid not in opted})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model, device="cpu", dtype=torch.float32).model.eval()
    rng = random.Random(args.seed)
    t, requests = 0.0, []
    for _ in range(args.num_requests):
        t += rng.expovariate(args.rate)
        requests.append((t, [rng.randrange(model.config.vocab_size) for _ in range(args.prompt_len)],
                         rng.random() < args.opt_in))
    runs: dict[str, list[dict]] = {"fixed": [], "adaptive": []}
    for _ in range(args.repeats):
        for policy in runs:
            row = run_mode(model, args, policy, requests)
            runs[policy].append(row)
            print(f"{policy}: {row['tok_s']:.1f} out tok/s, TTFT p50 {row['ttft_p50']:.2f} s, caps {row['cap_share']}",
                  flush=True)
    same = all(r["others"] == runs["fixed"][0]["others"] for rows in runs.values() for r in rows)
    print(f"\n{args.num_requests} requests at {args.rate}/s (Poisson), {args.prompt_len} + {args.output_len} tokens, "
          f"{args.opt_in:.0%} opt in, target {args.metric} {args.target}, max_num_seqs {args.max_num_seqs}, "
          f"{args.threads} thread(s), median of {args.repeats}\n")
    print("| policy | output tok/s | TTFT p50 (s) | TTFT p90 (s) | mean depth, opted in | mean depth, others | "
          "ticks at cap 1 / 2 / 3 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for policy, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("tok_s", "ttft_p50", "ttft_p90", "depth_opted",
                                                                  "depth_other")}
        share = " / ".join(f"{statistics.median(r['cap_share'].get(c, 0.0) for r in rows):.0%}" for c in (1, 2, 3))
        print(f"| {policy} | {med['tok_s']:.1f} | {med['ttft_p50']:.2f} | {med['ttft_p90']:.2f} | "
              f"{med['depth_opted']:.2f} | {med['depth_other']:.2f} | {share} |")
    print(f"\noutputs of the requests that did not opt in identical in every run: {same}")


if __name__ == "__main__":
    main()
