"""Scale-out benchmark: the same load (benchmarks/serving.py) against 1 and against N Ray Serve replicas
of morserve (morserve/serving/ray_app.py), in one run, interleaved round by round.

One local Ray cluster serves one application per replica count side by side (`/r1`, `/r2`, ...;
an idle replica's engine thread sleeps, so only the application under load computes), each
replica with --threads-per-replica torch threads. Reported per replica count: output tokens/s of
every round, their mean, TTFT (mean, p50, p99 over all rounds), and the mean's ratio to the first
count's. Ray starts its workers at niceness 15; here they run at 0
(RAY_worker_niceness), like the load generator, so that on a shared machine the replicas do not
yield the CPU to it and to every other process.

    python benchmarks/ray_replicas.py --model smollm2-135m-instruct --replicas 1,2 --rounds 2 \\
        --num-prompts 192 --max-concurrency 96 --max-num-seqs 32 --input-len 16 --output-len 48 \\
        --markdown ray_replicas.md

A load saturates every replica when --max-concurrency exceeds replicas x --max-num-seqs, and has
little tail when --num-prompts is several times the concurrency.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == _REPO / "benchmarks":  # benchmarks/kernels.py would shadow kernels
    sys.path[0] = str(_REPO)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import socket  # noqa: E402

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import HTTPOptions  # noqa: E402

from benchmarks import serving  # noqa: E402  (the load generator)
from morserve.serving.ray_app import application, parse_checked  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="morserve-mini-mor3")
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts to compare")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each count once per round)")
    p.add_argument("--threads-per-replica", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=64, help="batch slots per replica")
    p.add_argument("--serve-args", default="", help="more `morserve serve` flags for every replica, e.g. "
                                                    "'--num-scheduler-steps 8'")
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=16, help="words per random prompt")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    args.counts = [int(n) for n in args.replicas.split(",") if n]
    if not args.counts or min(args.counts) < 1 or args.rounds < 1:
        p.error("--replicas needs counts >= 1 and --rounds >= 1")
    return args


def deploy(args: argparse.Namespace, port: int) -> dict[int, str]:
    """One application per replica count; returns count -> base URL."""
    urls = {}
    for n in args.counts:
        ns = parse_checked(["--model", args.model, "--device", "cpu", "--num-replicas", str(n),
                            "--threads-per-replica", str(args.threads_per_replica),
                            "--max-num-seqs", str(args.max_num_seqs), "--replica-metrics-port", "0",
                            *shlex.split(args.serve_args)])
        serve.run(application(ns, cluster_gpus=0.0), name=f"r{n}", route_prefix=f"/r{n}")
        urls[n] = f"http://127.0.0.1:{port}/r{n}"
    return urls


def load(args: argparse.Namespace, url: str, round_: int) -> argparse.Namespace:
    return serving.parse_args(["--base-url", url, "--model", args.model, "--num-prompts", str(args.num_prompts),
                               "--max-concurrency", str(args.max_concurrency), "--input-len", str(args.input_len),
                               "--output-len", str(args.output_len), "--ignore-eos",
                               "--seed", str(args.seed + round_)])


def markdown(args: argparse.Namespace, rows: dict[int, dict]) -> str:
    base = rows[args.counts[0]]["mean_output_throughput"]
    lines = [f"| replicas | output tok/s per round | mean output tok/s | vs {args.counts[0]} | TTFT mean (ms) "
             "| TTFT p50 (ms) | TTFT p99 (ms) | failed |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n in args.counts:
        r = rows[n]
        rounds = ", ".join(f"{t:.1f}" for t in r["output_throughput"])
        lines.append(f"| {n} | {rounds} | {r['mean_output_throughput']:.1f} | {r['mean_output_throughput'] / base:.2f}x "
                     f"| {r['ttft_ms']['mean']:.0f} | {r['ttft_ms']['p50']:.0f} | {r['ttft_ms']['p99']:.0f} "
                     f"| {r['failed']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=sum(args.counts) * args.threads_per_replica, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
        urls = deploy(args, port)
        results: dict[int, list] = {n: [] for n in args.counts}
        for round_ in range(args.rounds):
            for n in args.counts:
                prompts = serving.random_prompts(args.num_prompts, args.input_len, args.seed + round_)
                requests, duration = asyncio.run(serving.run_benchmark(load(args, urls[n], round_), prompts))
                summary = serving.summarize(requests, duration, [50, 99])
                results[n].append((requests, summary))
                print(f"round {round_}: {n} replica(s): {summary['output_throughput']:.1f} output tok/s, "
                      f"TTFT mean {summary['ttft_ms']['mean']:.0f} ms, {summary['failed']} failed", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = {}
    for n, runs in results.items():
        every = [req for requests, _ in runs for req in requests]
        pooled = serving.summarize(every, sum(s["duration_s"] for _, s in runs), [50, 99])
        rows[n] = {"output_throughput": [s["output_throughput"] for _, s in runs],
                   "mean_output_throughput": sum(s["output_throughput"] for _, s in runs) / len(runs),
                   "ttft_ms": pooled["ttft_ms"], "failed": pooled["failed"]}
    report = markdown(args, rows)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
