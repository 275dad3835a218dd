"""`morserve train`: train a MoR language model from scratch or from a checkpoint (e.g. one made
by `morserve convert`), on CPU or CUDA, on a text file or a directory of text files.

The forward pass is the dense reference forward (`reference_forward`), or for expert choice with
recursion-wise KV the equal but gathered `topk_forward`: expert choice trains with
top-k routing at a capacity that warms up from 1.0 to the targets (cosine, `--cap-warmup-steps`)
and the auxiliary BCE loss that teaches the routers' threshold rule to reproduce top-k; token
choice trains with its argmax rule, a balancing loss and optional loss-free bias updates
(`mor.router_bias`). AdamW, linear warm-up then cosine learning rate, gradient clipping, bf16
autocast on CUDA. Writes our checkpoint format, a JSONL log (`train_log.jsonl`: loss terms,
routing statistics, held-out evaluations) and a loss-curve PNG into `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from morserve.checkpoint import load_pretrained, save_checkpoint
from morserve.config import ModelConfig, MoRConfig
from morserve.model.mor import MoRModel
from morserve.model.reference import reference_forward
from morserve.tokenizer import Tokenizer
from morserve.train.data import encode_corpus, fixed_batches, get_tokenizer, read_texts, sample_batch, split_holdout
from morserve.train.losses import LossWeights, total_loss
from morserve.train.metrics import decision_agreement, depth_histogram, evaluate, selection_fractions
from morserve.train.plots import plot_training_log
from morserve.train.schedule import capacity_at, learning_rate
from morserve.train.topk_forward import supports as topk_forward_supports
from morserve.train.topk_forward import topk_forward

LOG_FILE = "train_log.jsonl"
LOSS_PNG = "loss_curve.png"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TrainResult:
    """What a run ends with: the checkpoint directory and the final numbers."""

    out_dir: Path
    steps: int
    seconds: float
    train_loss: float
    eval: dict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="morserve train", description=__doc__.split("\n\n")[0])
    io = p.add_argument_group("data and output")
    io.add_argument("--data", required=True, help="text file or directory of text files")
    io.add_argument("--out", required=True, help="checkpoint directory to write")
    io.add_argument("--tokenizer", help="tokenizer.json (or its directory); default: train a BPE on --data")
    io.add_argument("--vocab-size", type=int, default=4096, help="BPE size when training a tokenizer")
    io.add_argument("--val-fraction", type=float, default=0.01, help="held-out tail of the token stream")
    io.add_argument("--save-dtype", choices=sorted(DTYPES), default="float32", help="weight storage dtype")
    io.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: end only)")

    m = p.add_argument_group("model (ignored with --init / --config)")
    m.add_argument("--init", help="start from this checkpoint (path or load_pretrained name)")
    m.add_argument("--config", help="model config JSON (our config.json format); vocab from the tokenizer")
    m.add_argument("--hidden-size", type=int, default=256)
    m.add_argument("--intermediate-size", type=int, help="default: 8/3 * hidden, rounded up to 64")
    m.add_argument("--num-layers", type=int, default=8, help="L: 1 + B*Nr + 1 for middle_cycle")
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, help="default: --heads")
    m.add_argument("--num-recursions", type=int, default=3)
    m.add_argument("--sharing", choices=["middle_cycle", "cycle"], default="middle_cycle")
    m.add_argument("--router", choices=["expert", "token", "none"], default="expert")
    m.add_argument("--router-type", choices=["linear", "mlp"], default="linear")
    m.add_argument("--kv-mode", choices=["recursion", "share_first"], default="recursion")
    m.add_argument("--alpha", type=float, default=0.1, help="router gate scale")
    m.add_argument("--capacity", help="comma-separated per-recursion capacities (default (Nr-i)/Nr)")
    m.add_argument("--init-std", type=float, default=0.02)

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000)
    o.add_argument("--batch-size", type=int, default=16)
    o.add_argument("--seq-len", type=int, default=256)
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
                   help="token: loss-free balancing, router_bias += rate * sign(1/Nr - load)")
    r.add_argument("--entropy-coef", type=float, default=0.0,
                   help="router entropy weight (> 0: decisive routers, < 0: exploration)")
    r.add_argument("--target-depth", type=float, help="pull the expected mean depth toward this")
    r.add_argument("--depth-coef", type=float, default=0.1, help="weight of the target-depth penalty")

    s = p.add_argument_group("run")
    s.add_argument("--device", default="auto", help="cpu, cuda or auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--log-every", type=int, default=10)
    s.add_argument("--eval-every", type=int, default=200)
    s.add_argument("--eval-batches", type=int, default=8)
    s.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def model_config_from_args(args: argparse.Namespace, tokenizer: Tokenizer) -> ModelConfig:
    """The architecture from --config or the flags, sized to the tokenizer's vocabulary."""
    special = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_ids or None}
    if args.config:
        data = json.loads(Path(args.config).read_text())
        data.update({k: v for k, v in special.items() if k != "vocab_size" or data.get(k, 0) < v})
        data["max_position_embeddings"] = max(data.get("max_position_embeddings", 0), args.seq_len)
        return ModelConfig.from_dict(data)
    d = args.hidden_size
    router = None if args.router == "none" else args.router
    mor = MoRConfig(num_recursions=args.num_recursions, sharing=args.sharing, router=router,
                    router_func="softmax" if router == "token" else "sigmoid",
                    router_type=args.router_type, alpha=args.alpha, kv_mode=args.kv_mode,
                    capacity=[float(c) for c in args.capacity.split(",")] if args.capacity else None,
                    router_bias=[0.0] * args.num_recursions if router == "token" and args.bias_update_rate else None)
    return ModelConfig(
        hidden_size=d, intermediate_size=args.intermediate_size or 64 * math.ceil(8 * d / 3 / 64),
        num_hidden_layers=args.num_layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=args.seq_len,
        mor=mor, **special).validate()


def param_groups(model: MoRModel, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def update_router_bias(mor: MoRConfig, depths: torch.Tensor, rate: float) -> None:
    """Loss-free balancing (token choice): raise the bias of under-used depths, lower the rest."""
    load = depth_histogram(depths, mor.num_recursions)
    target = 1.0 / mor.num_recursions
    bias = mor.router_bias or [0.0] * mor.num_recursions
    mor.router_bias = [b + rate * math.copysign(1.0, target - f) if f != target else b
                       for b, f in zip(bias, load)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(args: argparse.Namespace) -> TrainResult:
    """Run one training job as described by parsed `morserve train` arguments."""
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = read_texts(args.data)

    if args.init:
        pre = load_pretrained(args.init, device="cpu", dtype=torch.float32)
        model, tokenizer = pre.model, pre.tokenizer
        if args.tokenizer:
            tokenizer = get_tokenizer(args.tokenizer, texts, args.vocab_size)
        if tokenizer is None:
            raise SystemExit(f"{args.init} has no tokenizer: pass --tokenizer")
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, args.seq_len)
    else:
        tokenizer = get_tokenizer(args.tokenizer, texts, args.vocab_size)
        model = MoRModel(model_config_from_args(args, tokenizer)).init_weights(args.seed, args.init_std)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"tokenizer has {tokenizer.vocab_size} tokens, model only {model.config.vocab_size}")
    model.to(device).train()
    cfg, mor = model.config, model.config.mor

    ids = encode_corpus(tokenizer, texts)
    train_ids, val_ids = split_holdout(ids, args.val_fraction, min_tokens=2 * args.seq_len + 2)
    eval_set = fixed_batches(val_ids, args.batch_size, args.seq_len, args.eval_batches)
    weights = LossWeights(sampling=args.sampling_coef, z=args.z_coef, balance=args.balance_coef,
                          entropy=args.entropy_coef, depth=args.depth_coef, target_depth=args.target_depth)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    routing = "topk" if mor.router == "expert" else "threshold"
    gathered = topk_forward_supports(model)
    target_caps = mor.capacities
    cap_warmup = args.steps // 10 if args.cap_warmup_steps is None else args.cap_warmup_steps
    gen = torch.Generator().manual_seed(args.seed)
    log_path = out_dir / LOG_FILE
    (out_dir / "train_args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")

    print(f"model: {model.num_parameters() / 1e6:.2f} M parameters, L={cfg.num_hidden_layers} "
          f"(block {cfg.num_block_layers} x Nr {mor.num_recursions}), router {mor.router}, "
          f"vocab {cfg.vocab_size}; data: {len(train_ids)} train / {len(val_ids)} held-out tokens; "
          f"device {device}", flush=True)
    start = time.time()
    tokens_seen = 0
    last_lm = float("nan")
    with open(log_path, "w") as log:
        bar = tqdm(range(args.steps), disable=args.no_progress, desc="train", dynamic_ncols=True)
        for step in bar:
            lr = learning_rate(step, args.lr, args.lr * args.min_lr_ratio, args.warmup_steps, args.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = sample_batch(train_ids, args.batch_size, args.seq_len, gen)
            x, y = x.to(device), y.to(device)
            caps = capacity_at(step + 1, target_caps, cap_warmup)
            with autocast or nullcontext():
                out = topk_forward(model, x, caps) if gathered else \
                    reference_forward(model, x, routing=routing, capacities=caps)
                loss, parts = total_loss(out, y, mor, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
            opt.step()
            if mor.router == "token" and args.bias_update_rate:
                update_router_bias(mor, out.depths, args.bias_update_rate)
            tokens_seen += y.numel()
            last_lm = parts["lm"]
            if step % args.log_every == 0 or step == args.steps - 1:
                record = {"step": step + 1, "lr": lr, "loss": loss.item(), **{f"{k}_loss": v for k, v in parts.items()},
                          "grad_norm": grad_norm, "capacity": caps, "mean_depth": out.depths.float().mean().item(),
                          "selection": selection_fractions(out, mor.num_recursions),
                          "tokens": tokens_seen, "elapsed_s": time.time() - start}
                if mor.router == "expert":
                    record["agreement"] = decision_agreement(out, mor)
                if mor.router_bias is not None:
                    record["router_bias"] = list(mor.router_bias)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{parts['lm']:.3f}", depth=f"{record['mean_depth']:.2f}", lr=f"{lr:.1e}")
            if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
                ev = evaluate(model, eval_set, autocast)
                log.write(json.dumps({"step": step + 1, "eval": ev, "elapsed_s": time.time() - start}) + "\n")
                log.flush()
                tqdm.write(f"step {step + 1}: " + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {[round(a, 3) for a in v]}"
                    for k, v in ev.items()))
            if args.save_every and (step + 1) % args.save_every == 0 and step != args.steps - 1:
                save_checkpoint(model, tokenizer, out_dir, dtype=DTYPES[args.save_dtype])
    seconds = time.time() - start
    save_checkpoint(model, tokenizer, out_dir, dtype=DTYPES[args.save_dtype])
    plot_training_log(log_path, out_dir / LOSS_PNG)
    print(f"done: {args.steps} steps in {seconds / 60:.1f} min, final train loss {last_lm:.3f}, "
          f"held-out {ev['val_loss']:.3f}; checkpoint {out_dir}", flush=True)
    return TrainResult(out_dir, args.steps, seconds, last_lm, ev)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
