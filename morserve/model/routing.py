"""Routers and the pure routing math of MoR (design.md section 1).

Expert choice: router r (d -> 1) scores the residual stream h entering recursion r; the block
output is gated by p = alpha * act(w_r . h / temp). At inference a token takes recursion r > 1 iff
it took r - 1 and act(w_r . h) >= threshold (recursion 1 is always taken): a per-token rule,
so results never depend on what else is in the batch. Training uses top-k over the sequence.

Token choice: one router (d -> Nr) scores h after the prologue; probs = softmax * alpha; depth =
argmax(softmax + router_bias) + 1; the gate of the final recursion is probs[depth - 1].
For expert choice the optional router_bias (one per recursion) shifts the threshold decision only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from morserve.config import MoRConfig


class Router(nn.Module):
    """`linear`: Linear(d, out); `mlp`: Linear(d, 2d) -> GELU -> Linear(2d, out). No biases."""

    def __init__(self, hidden_size: int, out_features: int, router_type: str) -> None:
        super().__init__()
        if router_type == "linear":
            self.router = nn.Linear(hidden_size, out_features, bias=False)
        else:
            self.router = nn.Sequential(
                nn.Linear(hidden_size, 2 * hidden_size, bias=False), nn.GELU(),
                nn.Linear(2 * hidden_size, out_features, bias=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.router(h)


def router_activation(raw: torch.Tensor, router_func: str) -> torch.Tensor:
    """sigmoid or tanh of the raw expert-router score, computed in float32."""
    raw = raw.float()
    if router_func == "sigmoid":
        return torch.sigmoid(raw)
    if router_func == "tanh":
        return torch.tanh(raw)
    raise ValueError(f"expert routing has no router_func {router_func!r}")


def expert_gate(raw: torch.Tensor, cfg: MoRConfig) -> torch.Tensor:
    """p = alpha * act(raw): the weight of the block's output for a token taking the recursion."""
    return cfg.alpha * router_activation(raw, cfg.router_func)


def expert_takes(raw: torch.Tensor, cfg: MoRConfig, recursion: int | torch.Tensor,
                 bias: torch.Tensor | None = None,
                 threshold: float | torch.Tensor | None = None) -> torch.Tensor:
    """Inference rule: the token takes `recursion` (1-based) iff act(raw + router_bias[r-1]) >=
    threshold (bool tensor). The optional bias calibrates the decision only, never the gate.
    `recursion` may be a per-token tensor; then `bias` must hold cfg.router_bias as a float32
    tensor on raw's device (made once by the caller, so CUDA-graph capture copies nothing).
    `threshold` (a float, or a float32 tensor per token) overrides cfg.routing_threshold: a
    request's `router_threshold`."""
    if cfg.router_bias is not None:
        if isinstance(recursion, torch.Tensor):
            if bias is None:
                raise ValueError("expert_takes: a per-token recursion tensor needs the bias tensor")
            raw = raw.float() + bias[recursion - 1]
        else:
            raw = raw.float() + cfg.router_bias[recursion - 1]
    return router_activation(raw, cfg.router_func) >= (cfg.routing_threshold if threshold is None else threshold)


def expert_topk_select(raw: torch.Tensor, eligible: torch.Tensor, capacity: float) -> torch.Tensor:
    """Training-time expert choice: among `eligible` tokens of each row of raw [B, T], the
    top max(1, int(capacity * T)) by router score take the recursion (non-causal)."""
    t = raw.shape[-1]
    k = max(1, int(capacity * t))
    scores = raw.float().masked_fill(~eligible, float("-inf"))
    idx = scores.topk(k, dim=-1).indices
    chosen = torch.zeros_like(eligible)
    chosen.scatter_(-1, idx, True)
    return chosen & eligible


def token_choice(logits: torch.Tensor, cfg: MoRConfig, bias: torch.Tensor | None = None,
                 max_depth: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., Nr] -> (depth [...] in 1..Nr, gate weight [...] of the final recursion).
    `bias`: cfg.router_bias as a float32 tensor on the logits' device, when the caller has one
    (CUDA-graph capture must not copy from the host). `max_depth` (an int, or a per-token tensor
    shaped like the result) caps the depth: the argmax runs over depths 1..max_depth only, and the
    gate is the chosen depth's probability (the softmax itself is not renormalised)."""
    probs = F.softmax(logits.float(), dim=-1)
    scores = probs
    if cfg.router_bias is not None:
        scores = probs + (bias if bias is not None else
                          torch.tensor(cfg.router_bias, dtype=probs.dtype, device=probs.device))
    if max_depth is not None:
        depths = torch.arange(1, logits.shape[-1] + 1, device=logits.device)
        cap = max_depth.unsqueeze(-1) if isinstance(max_depth, torch.Tensor) else max_depth
        scores = scores.masked_fill(depths > cap, float("-inf"))
    choice = scores.argmax(dim=-1)
    weight = cfg.alpha * probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return choice + 1, weight
