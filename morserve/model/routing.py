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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
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


@dataclass
class PoolRows:
    """The engine's per-token state in pool rows (one per token in flight, indexed by pool slot):
    the hidden state, and what the router kind keeps (`entry`, `score`, see Routing), plus each
    token's request overrides (engine/depth.py): depth cap (int64) and expert threshold (float32)."""

    hidden: torch.Tensor
    entry: torch.Tensor | None
    score: torch.Tensor | None
    cap: torch.Tensor
    threshold: torch.Tensor


class Routing:
    """How one router kind moves a flat batch of tokens through the recursions (one object per kind,
    from `routing_for`). No router: every token takes every recursion (up to its depth cap) and
    the block output replaces the residual stream.

    Per-token state kept between passes in PoolRows: `score` (float32, expert and token choice)
    and, for token choice, `entry` (the hidden state at entry to the recursions); `target` (the
    chosen depth, token choice) is a per-token integer the caller keeps with the token's metadata.
    The engine's phases hand each kind a layer stack's output as (x, residual), un-added: the kinds
    fuse the add with the pool write and their row update (kernels.scatter_stream / update_*), the
    routers run as one GEMM, and one more kernel makes the decisions."""

    kind: str | None = None
    keeps_score = False            # one float32 per token: see the subclasses
    keeps_entry = False            # the token's hidden state after the prologue
    chooses_depth = False          # the depth is fixed at entry (target)

    def __init__(self, cfg: MoRConfig) -> None:
        self.cfg = cfg
        self._bias: dict[torch.device, torch.Tensor] = {}

    def modules(self, hidden_size: int) -> tuple[nn.ModuleList | None, Router | None]:
        """The router modules a model of this kind holds: (routers, router)."""
        return None, None

    def bias(self, device: torch.device) -> torch.Tensor:
        """cfg.router_bias (zeros if unset) as a float32 tensor on `device`, made once (CUDA-graph
        capture must not copy from the host: the warm-up run before it makes the tensor)."""
        if device not in self._bias:
            bias = self.cfg.router_bias or [0.0] * self.cfg.num_recursions
            self._bias[device] = torch.tensor(bias, dtype=torch.float32, device=device)
        return self._bias[device]

    def enter(self, model: nn.Module, rows: PoolRows, slots: torch.Tensor, x: torch.Tensor,
              residual: torch.Tensor | None) -> torch.Tensor | None:
        """At entry to the recursions: the prologue's output stream h = residual + x [T, d] goes to
        pool rows `slots` with the kind's per-token state; returns the target depth [T] (token
        choice, within each token's cap) or None."""
        kernels.scatter_stream(rows.hidden, slots, x, residual, None, None)
        return None

    def update(self, model: nn.Module, rows: PoolRows, slots: torch.Tensor, x: torch.Tensor,
               residual: torch.Tensor, depth: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """After one pass of the block over pool rows `slots` (its output stream residual + x,
        depth [T] the recursion just taken, target [T] the token-choice depth): the new residual
        stream and state into the pool rows; returns continue [T] bool."""
        return kernels.update_plain(rows.hidden, slots, x, residual, depth, rows.cap)


class ExpertRouting(Routing):
    """Expert choice. `score` is the raw score of the router of the token's next recursion on its
    current hidden state: the gate of that recursion and, from recursion 2 on, the decision to take
    it. Every router is evaluated once per pass, all in one GEMM (model.expert_router_scores)."""

    kind = "expert"
    keeps_score = True

    def modules(self, hidden_size: int) -> tuple[nn.ModuleList | None, Router | None]:
        cfg = self.cfg
        return nn.ModuleList(Router(hidden_size, 1, cfg.router_type) for _ in range(cfg.num_recursions)), None

    def enter(self, model, rows, slots, x, residual):
        scaled = kernels.scatter_stream(rows.hidden, slots, x, residual, None, self.cfg.temp)
        kernels.scatter_rows(rows.score.view(-1, 1), slots, model.expert_router_scores(scaled, 1))
        return None

    def update(self, model, rows, slots, x, residual, depth, target):
        cfg = self.cfg
        scaled = kernels.update_expert(rows.hidden, slots, x, residual, rows.score, cfg.alpha, cfg.router_func,
                                       cfg.temp)
        raw = model.expert_router_scores(scaled)
        return kernels.expert_decide(raw, depth, slots, rows.score, rows.cap, rows.threshold, self.bias(raw.device),
                                     cfg.router_func)


class TokenRouting(Routing):
    """Token choice: the router picks the depth after the prologue; `score` is the gate weight of
    the final recursion, which adds the block output to the entry state."""

    kind = "token"
    keeps_score = keeps_entry = chooses_depth = True

    def modules(self, hidden_size: int) -> tuple[nn.ModuleList | None, Router | None]:
        return None, Router(hidden_size, self.cfg.num_recursions, self.cfg.router_type)

    def enter(self, model, rows, slots, x, residual):
        scaled = kernels.scatter_stream(rows.hidden, slots, x, residual, rows.entry, self.cfg.temp)
        logits = model.router(scaled)
        return kernels.token_decide(logits, slots, rows.score, rows.cap, self.bias(logits.device), self.cfg.alpha)

    def update(self, model, rows, slots, x, residual, depth, target):     # target <= cap
        return kernels.update_token(rows.hidden, slots, x, residual, rows.entry, rows.score, depth, target)


_KINDS = {None: Routing, "expert": ExpertRouting, "token": TokenRouting}


def routing_for(cfg: MoRConfig) -> Routing:
    """The routing object of the config's router kind (None, "expert" or "token")."""
    return _KINDS[cfg.router](cfg)
