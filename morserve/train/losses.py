"""Training losses over a `ReferenceOutput`: next-token cross-entropy plus the routers'
auxiliary terms (pure functions, so each can be tested alone).

Expert choice (trained with top-k routing):
- sampling loss: BCE of router r's raw logit against "token was in the top-k of recursion r",
  over the tokens eligible for r (those that took r - 1), r >= 2. It teaches
  sigmoid(logit) >= 0.5 <=> top-k membership, which is what the causal inference threshold
  rule relies on;
- router z-loss: mean squared raw logit (the logsumexp of a single logit is the logit).
Token choice: balancing loss Nr * sum_i f_i * P_i (f_i: fraction of tokens whose depth is i,
P_i: mean router probability of depth i) and z-loss mean(logsumexp(logits)^2).
Both: optional router entropy term (coefficient > 0 rewards decisive routers, < 0 exploration)
and a squared penalty pulling the differentiable expected depth toward a target mean depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from morserve.config import MoRConfig
from morserve.model.reference import ReferenceOutput


@dataclass
class LossWeights:
    """Coefficients of the auxiliary terms (0 disables one); target_depth None disables the
    depth penalty."""

    sampling: float = 0.1
    z: float = 1e-3
    balance: float = 0.01
    entropy: float = 0.0
    depth: float = 0.0
    target_depth: float | None = None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits [..., V], targets [...]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _zero(out: ReferenceOutput) -> torch.Tensor:
    return out.logits.new_zeros((), dtype=torch.float32)


def expert_sampling_loss(out: ReferenceOutput) -> torch.Tensor:
    """Mean over recursions r >= 2 of BCE(raw_r, took r) over the tokens that took r - 1."""
    terms = []
    for r in range(1, len(out.selected)):
        eligible = out.selected[r - 1]
        if eligible.any():
            terms.append(F.binary_cross_entropy_with_logits(
                out.router_logits[r][eligible].float(), out.selected[r][eligible].float()))
    return torch.stack(terms).mean() if terms else _zero(out)


def expert_z_loss(out: ReferenceOutput) -> torch.Tensor:
    """Mean over recursions of the mean squared raw logit over the tokens entering r."""
    terms = [out.router_logits[0].float().pow(2).mean()] if out.router_logits else []
    for r in range(1, len(out.selected)):
        eligible = out.selected[r - 1]
        terms.append(out.router_logits[r][eligible].float().pow(2).mean())
    return torch.stack(terms).mean() if terms else _zero(out)


def token_z_loss(out: ReferenceOutput) -> torch.Tensor:
    return torch.logsumexp(out.router_logits[0].float(), dim=-1).pow(2).mean()


def token_balance_loss(out: ReferenceOutput, num_recursions: int) -> torch.Tensor:
    """Switch-Transformer style balance: Nr * sum_i f_i * P_i (1.0 when perfectly balanced)."""
    probs = F.softmax(out.router_logits[0].float(), dim=-1).reshape(-1, num_recursions)
    counts = torch.bincount(out.depths.reshape(-1) - 1, minlength=num_recursions).float()
    fraction = counts / counts.sum()
    return num_recursions * (fraction * probs.mean(0)).sum()


def _binary_entropy(raw: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(raw.float())
    return F.binary_cross_entropy_with_logits(raw.float(), p, reduction="none")


def router_entropy(out: ReferenceOutput, mor: MoRConfig) -> torch.Tensor:
    """Expert: mean binary entropy of sigmoid(logit) over eligible tokens, r >= 2; token: mean
    entropy of the softmax over depths (nats)."""
    if mor.router == "token":
        logp = F.log_softmax(out.router_logits[0].float(), dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()
    terms = [_binary_entropy(out.router_logits[r][out.selected[r - 1]]).mean()
             for r in range(1, len(out.selected)) if out.selected[r - 1].any()]
    return torch.stack(terms).mean() if terms else _zero(out)


def expected_depth(out: ReferenceOutput, mor: MoRConfig) -> torch.Tensor:
    """Differentiable mean depth. Expert: 1 + sum_{r>=2} prod_{s=2..r} sigmoid(logit_s) (the
    depth if each decision were a coin flip with the router's probability); token: sum_i i * p_i."""
    if mor.router == "token":
        probs = F.softmax(out.router_logits[0].float(), dim=-1)
        depths = torch.arange(1, probs.shape[-1] + 1, device=probs.device, dtype=probs.dtype)
        return (probs * depths).sum(-1).mean()
    reach = torch.ones_like(out.router_logits[0], dtype=torch.float32)
    depth = reach.clone()
    for raw in out.router_logits[1:]:
        reach = reach * torch.sigmoid(raw.float())
        depth = depth + reach
    return depth.mean()


def routing_losses(out: ReferenceOutput, mor: MoRConfig, weights: LossWeights) -> dict[str, torch.Tensor]:
    """The weighted auxiliary terms that apply to this router (name -> unweighted value is
    returned too, under the same name, by `total_loss`)."""
    terms: dict[str, torch.Tensor] = {}
    if mor.router == "expert":
        terms["sampling"] = expert_sampling_loss(out)
        terms["z"] = expert_z_loss(out)
    elif mor.router == "token":
        terms["balance"] = token_balance_loss(out, mor.num_recursions)
        terms["z"] = token_z_loss(out)
    else:
        return terms
    if weights.entropy:
        terms["entropy"] = router_entropy(out, mor)
    if weights.depth and weights.target_depth is not None:
        terms["depth"] = (expected_depth(out, mor) - weights.target_depth).pow(2)
    return terms


def total_loss(out: ReferenceOutput, targets: torch.Tensor, mor: MoRConfig,
               weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """LM loss plus weighted routing terms; also a dict of every unweighted term (floats)."""
    lm = lm_loss(out.logits, targets)
    loss = lm
    parts = {"lm": lm.item()}
    for name, value in routing_losses(out, mor, weights).items():
        loss = loss + getattr(weights, name) * value
        parts[name] = value.item()
    return loss, parts
