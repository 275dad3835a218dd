"""Train one model per (task, router) on the synthetic tasks and print a Markdown table: accuracy
on each task's hard kind next to its trivial baseline, and the mean depth every kind received.

    .venv/bin/python benchmarks/synthetic_tasks.py --steps 300 --hidden-size 64 --threads 1

With `--target-depths D1 D2 ...` it instead trains one model per (router, target) on the first
task and reports the routed mean depth (inference rule, held-out samples) next to the target.
Writes the per-kind reports as JSON to --out (one file per run) when given.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == _REPO / "benchmarks":  # benchmarks/kernels.py would shadow kernels
    sys.path[0] = str(_REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from morserve import lab  # noqa: E402
from morserve.threads import add_threads_flag, set_threads  # noqa: E402

HARD = {"copy": "copy", "counting": "count", "pattern": "repeat"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(HARD), choices=list(HARD))
    p.add_argument("--routers", nargs="+", default=["expert", "token"], choices=["expert", "token"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-recursions", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--samples", type=int, default=1024, help="evaluation samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-depths", nargs="+", type=float, help="measure depth steering instead")
    p.add_argument("--out", help="directory for the JSON reports")
    add_threads_flag(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s); {args.steps} steps x batch {args.batch_size}, d = {args.hidden_size}, "
          f"Nr = {args.num_recursions}, middle-cycle, 1-layer block, seed {args.seed}\n")
    if args.target_depths:
        return steering(args)
    print("| task | router | hard kind: accuracy / baseline | all predictable: accuracy / baseline | "
          "mean depth per kind (accuracy) | train s |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        for router in args.routers:
            m = lab.build(router=router, num_recursions=args.num_recursions, hidden_size=args.hidden_size,
                          task=task, seed=args.seed)
            metrics = lab.train(m, task=task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                warmup_steps=max(1, args.steps // 10), eval_every=10 ** 9, eval_size=256,
                                seed=args.seed)
            report = lab.task_report(m, task, samples=args.samples, seed=args.seed + 99)
            hard = report.kind(HARD[task])
            kinds = ", ".join(f"{k.name} {k.mean_depth:.2f} ({k.accuracy:.0%})" for k in report.kinds)
            print(f"| {task} | {router} | {hard.accuracy:.1%} / {hard.baseline:.1%} | {report.accuracy:.1%} / "
                  f"{report.baseline:.1%} | {kinds} | {metrics['seconds']:.0f} |", flush=True)
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / f"{task}-{router}.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def steering(args: argparse.Namespace) -> int:
    task = args.tasks[0]
    print(f"task {task}: routed mean depth (inference rule, {args.samples} held-out samples) vs target\n")
    print("| router | target | routed mean depth | depth histogram | hard kind accuracy / baseline |")
    print("|---|---|---|---|---|")
    for router in args.routers:
        for target in args.target_depths:
            m = lab.build(router=router, num_recursions=args.num_recursions, hidden_size=args.hidden_size,
                          task=task, seed=args.seed)
            lab.train(m, task=task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=max(1, args.steps // 10), eval_every=10 ** 9, eval_size=256, seed=args.seed,
                      target_depth=target)
            report = lab.task_report(m, task, samples=args.samples, seed=args.seed + 99)
            hard = report.kind(HARD[task])
            hist = " / ".join(f"{v:.0%}" for v in report.depth_hist)
            print(f"| {router} | {target} | {report.mean_depth:.3f} | {hist} | {hard.accuracy:.1%} / "
                  f"{hard.baseline:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
