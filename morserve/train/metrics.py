"""Routing statistics and held-out evaluation.

Two agreement rates between the causal inference rule (threshold) and training-time top-k:
- decision agreement: within one top-k forward pass, over the tokens eligible for recursion
  r >= 2, how often `act(logit) >= threshold` equals "was in the top-k" (the reference code's
  sampling accuracy);
- depth agreement: run the whole model both ways; fraction of tokens whose final depth is equal
  (errors compound across recursions, so this is the stricter number).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from morserve.config import MoRConfig
from morserve.model.mor import MoRModel
from morserve.model.reference import ReferenceOutput, reference_forward
from morserve.model.routing import expert_takes
from morserve.train.losses import lm_loss


def routing_rule(mor: MoRConfig) -> str:
    """How the model decides depths at inference, in words."""
    if mor.router == "expert":
        return "threshold (expert choice)"
    if mor.router == "token":
        return "argmax (token choice)"
    return "fixed depth (no router)"


def entropy_max(mor: MoRConfig) -> float | None:
    """Largest possible routing entropy per decision: ln 2 (a binary expert-choice decision) or
    ln Nr (one token-choice decision over Nr depths); None without a router."""
    if mor.router == "expert":
        return math.log(2)
    if mor.router == "token":
        return math.log(mor.num_recursions)
    return None


def depth_histogram(depths: torch.Tensor, num_recursions: int) -> list[float]:
    """Fraction of tokens at depth 1..Nr."""
    counts = torch.bincount(depths.reshape(-1).cpu(), minlength=num_recursions + 1)[1:].float()
    return (counts / counts.sum().clamp(min=1)).tolist()


def selection_fractions(out: ReferenceOutput, num_recursions: int) -> list[float]:
    """Fraction of all tokens that took each recursion (0 for recursions nobody reached)."""
    taken = [s.float().mean().item() for s in out.selected]
    return taken + [0.0] * (num_recursions - len(taken))


def decision_counts(out: ReferenceOutput, mor: MoRConfig) -> tuple[int, int]:
    """(agreeing, total) threshold-vs-top-k decisions of a top-k forward (expert choice)."""
    agree = total = 0
    for r in range(1, len(out.selected)):
        eligible = out.selected[r - 1]
        rule = expert_takes(out.router_logits[r], mor, r + 1)
        agree += int((rule == out.selected[r])[eligible].sum())
        total += int(eligible.sum())
    return agree, total


def decision_agreement(out: ReferenceOutput, mor: MoRConfig) -> float | None:
    agree, total = decision_counts(out, mor)
    return agree / total if total else None


@torch.no_grad()
def evaluate(model: MoRModel, batches: list[tuple[torch.Tensor, torch.Tensor]],
             autocast: torch.autocast | None = None) -> dict[str, float | list[float]]:
    """Held-out loss and routing statistics. Expert choice: both routings (`topk` at the
    config's capacities, `threshold`), with both agreement rates."""
    mor = model.config.mor
    nr = mor.num_recursions
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    routings = ("threshold", "topk") if mor.router == "expert" else ("threshold",)
    loss = {r: 0.0 for r in routings}
    tokens = agree_depth = agree_dec = total_dec = 0
    depths = []
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast or nullcontext():
            outs = {r: reference_forward(model, x, routing=r) for r in routings}
        for r, out in outs.items():
            loss[r] += lm_loss(out.logits, y).item() * y.numel()
        depths.append(outs["threshold"].depths.cpu())
        tokens += y.numel()
        if "topk" in outs:
            agree_depth += int((outs["topk"].depths == outs["threshold"].depths).sum())
            a, t = decision_counts(outs["topk"], mor)
            agree_dec, total_dec = agree_dec + a, total_dec + t
    model.train(was_training)
    all_depths = torch.cat([d.reshape(-1) for d in depths])
    result: dict[str, float | list[float]] = {
        "val_loss": loss["threshold"] / tokens,
        "mean_depth": all_depths.float().mean().item(),
        "depth_hist": depth_histogram(all_depths, nr),
    }
    if "topk" in loss:
        result["val_loss_topk"] = loss["topk"] / tokens
        result["depth_agreement"] = agree_depth / tokens
        result["decision_agreement"] = agree_dec / total_dec if total_dec else 1.0
    return result
