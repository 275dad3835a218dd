"""The training loop behind `morserve train` and `morserve.lab.train`: fit a MoR model on a data
source (a text corpus, `CorpusData`, or a synthetic task, `TaskData`), on CPU or CUDA.

The forward pass is the dense reference forward (`reference_forward`), or for expert choice with
recursion-wise KV the equal but gathered `topk_forward`: expert choice trains with
top-k routing at a capacity that warms up from 1.0 to the targets (cosine, `cap_warmup_steps`)
and the auxiliary BCE loss that teaches the routers' threshold rule to reproduce top-k; token
choice trains with its argmax rule, a balancing loss and optional loss-free bias updates
(`mor.router_bias`). A target mean depth steers the routed depth (`depth_target`). AdamW, linear
warm-up then cosine learning rate, gradient clipping, bf16 autocast on CUDA. With an output
directory it writes our checkpoint format, a JSONL log (`train_log.jsonl`: loss terms, routing
statistics, held-out evaluations) and a loss-curve PNG.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from morserve.checkpoint import save_checkpoint
from morserve.model.mor import MoRModel
from morserve.model.reference import reference_forward
from morserve.threads import set_threads
from morserve.tokenizer import Tokenizer
from morserve.train.depth_target import (check_target, depth_loads, expert_bias, fit_token_bias,
                                         steer_expert_capacity, update_router_bias)
from morserve.train.losses import LossWeights, total_loss
from morserve.train.metrics import decision_agreement, routing_rule, selection_fractions
from morserve.train.plots import plot_training_log
from morserve.train.schedule import capacity_at, learning_rate
from morserve.train.topk_forward import supports as topk_forward_supports
from morserve.train.topk_forward import topk_forward

LOG_FILE = "train_log.jsonl"
LOSS_PNG = "loss_curve.png"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TARGET_BIAS_RATE = 0.01   # token choice with a target depth and no explicit bias update rate


class TrainData(Protocol):
    """What the loop needs from a data source."""

    seq_len: int

    def describe(self) -> str: ...

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...

    def evaluate(self, model: MoRModel, autocast: AbstractContextManager | None = None) -> dict: ...


@dataclass
class TrainSettings:
    """Optimisation, routing-loss and run settings (the `morserve train` flags of the same names)."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    cap_warmup_steps: int | None = None      # default: 10% of steps
    sampling_coef: float = 0.1
    z_coef: float = 1e-3
    balance_coef: float = 0.01
    bias_update_rate: float = 0.0
    entropy_coef: float = 0.0
    target_depth: float | None = None
    depth_coef: float = 0.1
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 0
    save_dtype: str = "float32"
    progress: bool = True

    def validate(self) -> "TrainSettings":
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.save_dtype not in DTYPES:
            raise ValueError(f"save_dtype must be one of {sorted(DTYPES)}, got {self.save_dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        return self


@dataclass
class TrainResult:
    """What a run ends with: the checkpoint directory and the final numbers."""

    out_dir: Path | None
    steps: int
    seconds: float
    train_loss: float
    eval: dict
    history: list[dict] = field(default_factory=list)


def param_groups(model: MoRModel, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _steer_depth(model: MoRModel, settings: TrainSettings) -> tuple[float, list[float] | None]:
    """Apply the target depth: expert capacities, or the token-choice bias rate and loads."""
    mor, target, rate = model.config.mor, settings.target_depth, settings.bias_update_rate
    if target is None:
        return rate, [1.0 / mor.num_recursions] * mor.num_recursions if mor.router == "token" else None
    check_target(target, mor.num_recursions)
    if mor.router == "expert":
        steer_expert_capacity(mor, target)
        return rate, None
    if mor.router != "token":
        raise ValueError("a target depth needs a router (expert or token choice)")
    return rate or TARGET_BIAS_RATE, depth_loads(target, mor.num_recursions)


@torch.no_grad()
def calibrate_router_bias(model: MoRModel, data: TrainData, settings: TrainSettings,
                          target_loads: list[float] | None, generator: torch.Generator, batches: int = 8) -> None:
    """Set mor.router_bias so that the inference rule's decisions on fresh training batches hit
    the target depth: token choice, the loads `target_loads` (`fit_token_bias`); expert choice,
    the capacities, one recursion at a time (`expert_bias`)."""
    device = next(model.parameters()).device
    model.eval()
    x = torch.cat([data.sample(settings.batch_size, generator)[0] for _ in range(batches)]).to(device)
    mor = model.config.mor
    if mor.router == "token":
        probs = torch.softmax(reference_forward(model, x).router_logits[0].float(), -1)
        mor.router_bias = fit_token_bias(probs.reshape(-1, mor.num_recursions).cpu(), target_loads, mor.router_bias)
    else:
        mor.router_bias = [0.0] * mor.num_recursions
        for r in range(2, mor.num_recursions + 1):
            out = reference_forward(model, x)
            mor.router_bias[r - 1] = expert_bias(out.router_logits[r - 1], out.selected[r - 2],
                                                 mor.capacities[r - 1], mor)
    model.train()


def _format_eval(ev: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {[round(a, 3) for a in v]}"
                     for k, v in ev.items() if isinstance(v, (float, list)))


def fit(model: MoRModel, data: TrainData, settings: TrainSettings, out_dir: str | Path | None = None,
        tokenizer: Tokenizer | None = None) -> TrainResult:
    """Train `model` in place on `data`; with `out_dir`, write the checkpoint (with `tokenizer`),
    the JSONL log and the loss-curve PNG there. Returns the final numbers and the log records."""
    settings.validate()
    set_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, data.seq_len)
    model.to(device).train()
    cfg, mor = model.config, model.config.mor
    bias_rate, target_loads = _steer_depth(model, settings)
    if mor.router == "token" and bias_rate and mor.router_bias is None:
        mor.router_bias = [0.0] * mor.num_recursions
    weights = LossWeights(sampling=settings.sampling_coef, z=settings.z_coef, balance=settings.balance_coef,
                          entropy=settings.entropy_coef, depth=settings.depth_coef,
                          target_depth=settings.target_depth if mor.router == "token" else None)
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    routing = "topk" if mor.router == "expert" else "threshold"
    gathered = topk_forward_supports(model)
    target_caps = mor.capacities
    cap_warmup = settings.steps // 10 if settings.cap_warmup_steps is None else settings.cap_warmup_steps
    gen = torch.Generator().manual_seed(settings.seed)
    history: list[dict] = []
    log = open(out_dir / LOG_FILE, "w") if out_dir is not None else None

    def record(entry: dict) -> None:
        history.append(entry)
        if log is not None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    if settings.progress:
        print(f"model: {model.num_parameters() / 1e6:.2f} M parameters, L={cfg.num_hidden_layers} "
              f"(block {cfg.num_block_layers} x Nr {mor.num_recursions}, {mor.sharing}), router {mor.router}, "
              f"vocab {cfg.vocab_size}; data: {data.describe()}; device {device}", flush=True)
    start = time.time()
    tokens_seen = 0
    last_lm = float("nan")
    ev: dict = {}
    try:
        bar = tqdm(range(settings.steps), disable=not settings.progress, desc="train", dynamic_ncols=True)
        for step in bar:
            lr = learning_rate(step, settings.lr, settings.lr * settings.min_lr_ratio, settings.warmup_steps,
                               settings.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = data.sample(settings.batch_size, gen)
            x, y = x.to(device), y.to(device)
            caps = capacity_at(step + 1, target_caps, cap_warmup)
            with autocast or nullcontext():
                out = topk_forward(model, x, caps) if gathered else \
                    reference_forward(model, x, routing=routing, capacities=caps)
                loss, parts = total_loss(out, y, mor, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip).item()
            opt.step()
            if mor.router == "token" and bias_rate:
                update_router_bias(mor, out.depths, bias_rate, target_loads)
            tokens_seen += y.numel()
            last_lm = parts["lm"]
            if step % settings.log_every == 0 or step == settings.steps - 1:
                entry = {"step": step + 1, "lr": lr, "loss": loss.item(), **{f"{k}_loss": v for k, v in parts.items()},
                         "grad_norm": grad_norm, "capacity": caps, "mean_depth": out.depths.float().mean().item(),
                         "selection": selection_fractions(out, mor.num_recursions),
                         "tokens": tokens_seen, "elapsed_s": time.time() - start}
                if mor.router == "expert":
                    entry["agreement"] = decision_agreement(out, mor)
                if mor.router_bias is not None:
                    entry["router_bias"] = list(mor.router_bias)
                record(entry)
                bar.set_postfix(loss=f"{parts['lm']:.3f}", depth=f"{entry['mean_depth']:.2f}", lr=f"{lr:.1e}")
            if (step + 1) % settings.eval_every == 0 or step == settings.steps - 1:
                ev = data.evaluate(model, autocast)
                record({"step": step + 1, "eval": ev, "elapsed_s": time.time() - start})
                if settings.progress:
                    tqdm.write(f"step {step + 1}: {_format_eval(ev)}")
            if out_dir is not None and settings.save_every and (step + 1) % settings.save_every == 0 \
                    and step != settings.steps - 1:
                save_checkpoint(model, tokenizer, out_dir, dtype=DTYPES[settings.save_dtype])
    finally:
        if log is not None:
            log.close()
    if settings.target_depth is not None:
        calibrate_router_bias(model, data, settings, target_loads, gen)
        ev = data.evaluate(model, autocast)
        record({"step": settings.steps, "eval": ev, "router_bias": list(mor.router_bias), "calibrated": True,
                "elapsed_s": time.time() - start})
    seconds = time.time() - start
    model.eval()
    if out_dir is not None:
        save_checkpoint(model, tokenizer, out_dir, dtype=DTYPES[settings.save_dtype])
        plot_training_log(out_dir / LOG_FILE, out_dir / LOSS_PNG, routing_rule(mor),
                          "top-k" if routing == "topk" else routing_rule(mor))
    if settings.progress:
        print(f"done: {settings.steps} steps in {seconds / 60:.1f} min, final train loss {last_lm:.3f}, "
              f"held-out {ev['val_loss']:.3f}" + (f"; checkpoint {out_dir}" if out_dir else ""), flush=True)
    return TrainResult(out_dir, settings.steps, seconds, last_lm, ev, history)
