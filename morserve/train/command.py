"""`morserve train`: the command line over `morserve.lab` (build or load a model, train it on a
text corpus (`--data`) or a synthetic task (`--task copy|counting|pattern`), write a checkpoint).

Expert-choice capacity: `--capacity 1,0.6,0.3` (one fraction per recursion), `--keep-ratio K`
(geometric: 1, K, K^2, ...), or neither (the paper's (Nr-i)/Nr). `--target-depth D` steers the
routed mean depth instead (expert: the keep ratio whose capacities sum to D; token choice:
loss-free bias updates toward a depth distribution of mean D).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from morserve import lab
from morserve.config import SHARINGS
from morserve.train.task_eval import format_task_report
from morserve.train.tasks import TASKS
from morserve.threads import add_threads_flag, set_threads
from morserve.train.trainer import DTYPES, TrainSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="morserve train", description=__doc__.split("\n\n")[0])
    io = p.add_argument_group("data and output")
    src = io.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="text file or directory of text files")
    src.add_argument("--task", choices=sorted(TASKS), help="synthetic task (fixed vocabulary, no tokenizer training)")
    io.add_argument("--out", required=True, help="checkpoint directory to write")
    io.add_argument("--tokenizer", help="tokenizer.json (or its directory); default: train a BPE on --data")
    io.add_argument("--vocab-size", type=int, default=4096, help="BPE size when training a tokenizer")
    io.add_argument("--val-fraction", type=float, default=0.01, help="held-out tail of the token stream")
    io.add_argument("--eval-samples", type=int, default=512, help="task samples in the evaluation set")
    io.add_argument("--save-dtype", choices=sorted(DTYPES), default="float32", help="weight storage dtype")
    io.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: end only)")

    m = p.add_argument_group("model (ignored with --init / --config)")
    m.add_argument("--init", help="start from this checkpoint (path or load_pretrained name)")
    m.add_argument("--config", help="model config JSON (our config.json format); vocab from the tokenizer")
    m.add_argument("--hidden-size", type=int, default=256)
    m.add_argument("--intermediate-size", type=int, help="default: 8/3 * hidden, rounded up to 64")
    m.add_argument("--num-layers", type=int, default=8, help="L: 1 + B*Nr + 1 for the middle_ sharings, B*Nr otherwise")
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, help="default: --heads")
    m.add_argument("--num-recursions", type=int, default=3)
    m.add_argument("--sharing", choices=SHARINGS, default="middle_cycle",
                   help="cycle layouts loop a block (routable); sequence layouts repeat each layer (router none)")
    m.add_argument("--router", choices=["expert", "token", "none"], default="expert")
    m.add_argument("--router-type", choices=["linear", "mlp"], default="linear")
    m.add_argument("--kv-mode", choices=["recursion", "share_first"], default="recursion")
    m.add_argument("--alpha", type=float, default=0.1, help="router gate scale")
    cap = m.add_mutually_exclusive_group()
    cap.add_argument("--capacity", help="per-recursion capacities (comma-separated) or one keep ratio")
    cap.add_argument("--keep-ratio", type=float, help="geometric capacities 1, K, K^2, ... (expert choice)")
    m.add_argument("--init-std", type=float, default=0.02)

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000)
    o.add_argument("--batch-size", type=int, default=16)
    o.add_argument("--seq-len", type=int, default=256, help="window length (corpus)")
    o.add_argument("--lr", type=float, default=3e-3)
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr = lr * ratio")
    o.add_argument("--warmup-steps", type=int, default=100)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--cap-warmup-steps", type=int, help="capacity warm-up (default: 10%% of --steps)")

    r = p.add_argument_group("routing losses")
    r.add_argument("--sampling-coef", type=float, default=0.1, help="expert: BCE aux loss weight")
    r.add_argument("--z-coef", type=float, default=1e-3, help="router z-loss weight")
    r.add_argument("--balance-coef", type=float, default=0.01, help="token: balancing loss weight")
    r.add_argument("--bias-update-rate", type=float, default=0.0,
                   help="token: loss-free balancing, router_bias += rate * sign(target load - load)")
    r.add_argument("--entropy-coef", type=float, default=0.0,
                   help="router entropy weight (> 0: decisive routers, < 0: exploration)")
    r.add_argument("--target-depth", type=float, help="steer the routed mean depth to this (see above)")
    r.add_argument("--depth-coef", type=float, default=0.1, help="token: weight of the soft expected-depth penalty")

    s = p.add_argument_group("run")
    s.add_argument("--device", default="auto", help="cpu, cuda or auto")
    s.add_argument("--seed", type=int, default=0)
    add_threads_flag(s)
    s.add_argument("--log-every", type=int, default=10)
    s.add_argument("--eval-every", type=int, default=200)
    s.add_argument("--eval-batches", type=int, default=8)
    s.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def parse_capacity(text: str | None, keep_ratio: float | None) -> float | list[float] | None:
    """--capacity '1,0.5,0.25' -> list; '0.5' -> keep ratio; --keep-ratio K -> K."""
    if keep_ratio is not None:
        return keep_ratio
    if text is None:
        return None
    values = [float(c) for c in text.split(",")]
    return values[0] if len(values) == 1 else values


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    names = {f.name for f in fields(TrainSettings)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainSettings(**values, progress=not args.no_progress)


def model_from_args(args: argparse.Namespace, texts_or_none) -> lab.LabModel:
    """Load --init, or build from --config or the architecture flags."""
    if args.init:
        lm = lab.load(args.init)
        if args.tokenizer:
            lm.tokenizer = lab.Tokenizer.load(Path(args.tokenizer).parent if Path(args.tokenizer).is_file()
                                              else args.tokenizer)
        return lm
    tokenizer = args.tokenizer and (Path(args.tokenizer).parent if Path(args.tokenizer).is_file() else args.tokenizer)
    if args.config:
        return lab.from_config(json.loads(Path(args.config).read_text()), tokenizer=tokenizer,
                               corpus=texts_or_none, vocab_size=args.vocab_size, task=args.task,
                               seed=args.seed, init_std=args.init_std)
    router = None if args.router == "none" else args.router
    return lab.build(router, args.num_recursions, args.hidden_size, num_layers=args.num_layers, heads=args.heads,
                     kv_heads=args.kv_heads, intermediate_size=args.intermediate_size, sharing=args.sharing,
                     kv_mode=args.kv_mode, capacity=parse_capacity(args.capacity, args.keep_ratio),
                     alpha=args.alpha, router_type=args.router_type, max_len=args.seq_len, task=args.task,
                     corpus=texts_or_none, tokenizer=tokenizer, vocab_size=args.vocab_size, seed=args.seed,
                     init_std=args.init_std)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        set_threads(args.threads)
        settings = settings_from_args(args).validate()
        texts = lab.read_texts(args.data) if args.data else None
        lm = model_from_args(args, texts)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_args.json").write_text(json.dumps({"argv": argv, **vars(args)}, indent=2, default=str) + "\n")
        extra = {k: getattr(settings, k) for k in (f.name for f in fields(TrainSettings)) if k != "steps"}
        if args.task:
            metrics = lab.train(lm, task=args.task, steps=settings.steps, eval_size=args.eval_samples, out=out, **extra)
            report = lab.task_report(lm, args.task, samples=args.eval_samples)
            (out / "task_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            print(format_task_report(report))
        else:
            metrics = lab.train(lm, corpus=texts, steps=settings.steps, seq_len=args.seq_len,
                                val_fraction=args.val_fraction, eval_batches=args.eval_batches, out=out, **extra)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"morserve train: {exc}") from None
    print(f"final: train loss {metrics['train_loss']:.3f}, held-out loss {metrics['val_loss']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
