"""Dense reference forward: whole sequences, no cache, explicit masks. The oracle of every test.

For a batch [B, T] it runs the prologue, then recursion r = 1..Nr of the shared block, then the
epilogue. At recursion r only tokens that take r are updated; their attention sees
- kv_mode `recursion`: only earlier tokens that also took r (their depth-r K/V),
- kv_mode `share_first`: every earlier token's recursion-1 K/V (deeper recursions write nothing).
Routing `threshold` is the causal inference rule (engine-reproducible); `topk` is the reference
training code's non-causal top-k over the sequence (expert choice only). Rows must be whole,
unpadded sequences. A request's depth overrides (SamplingParams.max_depth, router_threshold)
apply as in the engine: no token takes a recursion deeper than `max_depth` (token choice: the
argmax runs over depths 1..max_depth), and expert choice compares with `router_threshold`.
`max_depth` may also be a per-position tensor ([T] or [B, T]): the caps a load-adaptive depth
policy gave each token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from morserve.config import SEQUENCE_SHARINGS
from morserve.model.mor import MoRModel
from morserve.model.routing import expert_gate, expert_takes, expert_topk_select, token_choice
from morserve.model.sharing import vanilla_view

ROUTINGS = ("threshold", "topk")


@dataclass
class ReferenceOutput:
    logits: torch.Tensor                  # [B, T, V] (or [T, V] for 1-D input)
    depths: torch.Tensor                  # [B, T] recursions taken by each token (or [T])
    hidden: torch.Tensor                  # [B, T, d] final hidden state before the norm
    router_logits: list[torch.Tensor] = field(default_factory=list)  # expert: Nr x [B, T]; token: [B, T, Nr]
    selected: list[torch.Tensor] = field(default_factory=list)       # Nr x [B, T] bool: who took recursion r


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """q [B, T, H, D], k/v [B, S, Hkv, D], allowed [B, T, S] bool -> [B, T, H, D] (float32 softmax)."""
    h, hkv = q.shape[-2], k.shape[-2]
    k = k.repeat_interleave(h // hkv, dim=-2)
    v = v.repeat_interleave(h // hkv, dim=-2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v.float()).to(q.dtype)


def reference_forward(model: MoRModel, input_ids: torch.Tensor, routing: str = "threshold",
                      capacities: list[float] | None = None, max_depth: int | torch.Tensor | None = None,
                      router_threshold: float | None = None) -> ReferenceOutput:
    """Logits and per-token depth for input_ids [T] or [B, T]. `capacities` overrides the
    config's for top-k routing (training uses a capacity warm-up schedule); `max_depth` and
    `router_threshold` are a request's depth overrides (see the module docstring)."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if model.config.mor.sharing in SEQUENCE_SHARINGS:   # fixed depth: run the layer list
        return reference_forward(vanilla_view(model), input_ids, routing, capacities)
    cfg = model.config
    mor = cfg.mor
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    b, t = ids.shape
    dev = ids.device
    cap = torch.as_tensor(mor.num_recursions if max_depth is None else max_depth, device=dev)
    cap = (cap[None] if cap.dim() == 1 else cap).expand(b, t)
    h = model.embed_tokens(ids)
    positions = torch.arange(t, device=dev)
    cos, sin = model.rope(positions, h.dtype)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=dev)).expand(b, t, t)

    def attend_causal(q, k, v):
        return masked_attention(q, k, v, causal)

    for layer in model.prologue:
        h = layer(h, cos, sin, attend_causal)

    out = ReferenceOutput(logits=None, depths=torch.zeros(b, t, dtype=torch.long, device=dev), hidden=None)
    taking = torch.ones(b, t, dtype=torch.bool, device=dev)
    depth_choice = weight_choice = None
    h_entry = h
    if mor.router == "token":
        tok_logits = model.token_router_logits(h)
        out.router_logits.append(tok_logits)
        depth_choice, weight_choice = token_choice(tok_logits, mor, max_depth=cap)
    shared_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    for r in range(1, int(cap.max()) + 1):
        gate = None
        if mor.router == "expert":
            raw = model.expert_router_logit(r, h)
            out.router_logits.append(raw)
            if r > 1:
                rule = expert_takes(raw, mor, r, threshold=router_threshold) if routing == "threshold" else \
                    expert_topk_select(raw, taking, (capacities or mor.capacities)[r - 1])
                taking = taking & rule
            gate = expert_gate(raw, mor).to(h.dtype)
        elif mor.router == "token":
            taking = depth_choice >= r
        taking = taking & (cap >= r)
        out.selected.append(taking)
        if not taking.any():
            break
        out.depths += taking.long()
        # recursion-wise: a query row sees earlier tokens taking r; rows not taking r are
        # computed (they see only themselves) and then discarded.
        eye = torch.eye(t, dtype=torch.bool, device=dev)
        allowed = causal & ((taking[:, :, None] & taking[:, None, :]) | eye)
        x = h
        for j, layer in enumerate(model.block):
            if mor.kv_mode == "share_first" and r > 1:
                k1, v1 = shared_kv[j]
                x = layer(x, cos, sin, lambda q, k, v, k1=k1, v1=v1: masked_attention(q, k1, v1, causal))
            else:
                def attend(q, k, v, j=j):
                    if mor.kv_mode == "share_first":
                        shared_kv.append((k, v))
                    return masked_attention(q, k, v, allowed)
                x = layer(x, cos, sin, attend)
        if mor.router == "expert":
            new_h = h + gate[..., None] * x
        elif mor.router == "token":
            final = (depth_choice == r)[..., None]
            new_h = torch.where(final, h_entry + weight_choice[..., None].to(h.dtype) * x, x)
        else:
            new_h = x
        h = torch.where(taking[..., None], new_h, h)

    for layer in model.epilogue:
        h = layer(h, cos, sin, attend_causal)
    out.hidden = h
    out.logits = model.logits(h)
    if squeeze:
        out.logits, out.depths, out.hidden = out.logits[0], out.depths[0], out.hidden[0]
        out.router_logits = [x[0] for x in out.router_logits]
        out.selected = [x[0] for x in out.selected]
    return out
