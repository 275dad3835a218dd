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


class Routing:
    """How one router kind moves a flat batch of tokens through the recursions (one object per kind,
    from `routing_for`). No router: every token takes every recursion and the block output
    replaces the residual stream.

    Per-token state kept between passes, in pool rows the caller owns: `score` (float32, expert and
    token choice) and, for token choice, `entry` (the hidden state at entry to the recursions) and
    `target` (the chosen depth, a per-token integer the caller keeps with the token's metadata)."""

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

    def enter(self, model: nn.Module, h: torch.Tensor,
              cap: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """At entry to the recursions (h = prologue output [T, d]; cap [T]: each token's request
        depth cap, Nr if None): (target depth [T] or None, score [T] float32 or None)."""
        return None, None

    def update(self, model: nn.Module, h: torch.Tensor, x: torch.Tensor, depth: torch.Tensor,
               target: torch.Tensor, entry: torch.Tensor | None, score: torch.Tensor | None,
               cap: torch.Tensor | None = None,
               threshold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """After one pass of the block (h its input, x its output, depth [T] the recursion just
        taken; cap / threshold [T]: the tokens' request overrides, engine/depth.py; None: the
        config's): (new residual stream [T, d], continue [T] bool, new score or None)."""
        return x, depth < (self.cfg.num_recursions if cap is None else cap), None


class ExpertRouting(Routing):
    """Expert choice. `score` is the raw score of the router of the token's next recursion on its
    current hidden state: the gate of that recursion and, from recursion 2 on, the decision to take
    it. Every router is evaluated once per pass, all in one GEMM (model.expert_router_logits)."""

    kind = "expert"
    keeps_score = True

    def modules(self, hidden_size: int) -> tuple[nn.ModuleList | None, Router | None]:
        cfg = self.cfg
        return nn.ModuleList(Router(hidden_size, 1, cfg.router_type) for _ in range(cfg.num_recursions)), None

    def enter(self, model, h, cap=None):
        return None, model.expert_router_logit(1, h).float()

    def update(self, model, h, x, depth, target, entry, score, cap=None, threshold=None):
        cfg = self.cfg
        new_h = h + expert_gate(score, cfg)[:, None].to(h.dtype) * x
        following = depth.clamp(max=cfg.num_recursions - 1)[:, None]        # 0-based index of router d+1
        raw = model.expert_router_logits(new_h).gather(1, following).squeeze(1).float()
        takes = expert_takes(raw, cfg, following.squeeze(1) + 1, self.bias(raw.device), threshold)
        cont = (depth < (cfg.num_recursions if cap is None else cap)) & takes
        return new_h, cont, raw


class TokenRouting(Routing):
    """Token choice: the router picks the depth after the prologue; `score` is the gate weight of
    the final recursion, which adds the block output to the entry state."""

    kind = "token"
    keeps_score = keeps_entry = chooses_depth = True

    def modules(self, hidden_size: int) -> tuple[nn.ModuleList | None, Router | None]:
        return None, Router(hidden_size, self.cfg.num_recursions, self.cfg.router_type)

    def enter(self, model, h, cap=None):
        logits = model.token_router_logits(h)
        depth, weight = token_choice(logits, self.cfg, self.bias(logits.device) if self.cfg.router_bias else None,
                                     cap)
        return depth, weight.float()

    def update(self, model, h, x, depth, target, entry, score, cap=None, threshold=None):     # target <= cap
        final = (target == depth)[:, None]
        return torch.where(final, entry + score[:, None].to(h.dtype) * x, x), target > depth, score


_KINDS = {None: Routing, "expert": ExpertRouting, "token": TokenRouting}


def routing_for(cfg: MoRConfig) -> Routing:
    """The routing object of the config's router kind (None, "expert" or "token")."""
    return _KINDS[cfg.router](cfg)
