"""Gathered top-k forward for training expert-choice models with recursion-wise KV: the same
function as `reference_forward(model, ids, routing="topk")`, computed the way the reference MoR
training code does it, which is what makes CPU training affordable.

At recursion r the top-k tokens of each row (exactly k = max(1, int(capacity_r * T)) of them,
chosen among those that took r - 1) are gathered in position order, the shared block runs on
them alone with plain causal attention among them (scaled_dot_product_attention; RoPE at their
original positions), and the gated update is scattered back. The dense reference instead runs
every token through every recursion under an explicit mask and throws the unselected rows away;
the selected rows see exactly the same keys in both, so the outputs agree (tests check it).
Rows are processed as one flat batch of tokens, the layout `DecoderLayer` takes from the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from morserve.model.layers import AttendFn
from morserve.model.mor import MoRModel
from morserve.model.reference import ReferenceOutput
from morserve.model.routing import expert_gate, expert_topk_select


def supports(model: MoRModel) -> bool:
    """Whether `topk_forward` computes this model (expert choice, recursion-wise KV)."""
    mor = model.config.mor
    return mor.router == "expert" and mor.kv_mode == "recursion"


def _causal_rows(batch: int, length: int) -> AttendFn:
    """Attention for a flat [batch * length] token batch: causal within each row."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (x.reshape(batch, length, *x.shape[-2:]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2).reshape(batch * length, q.shape[1], q.shape[-1])
    return attend


def _run_layers(layers: torch.nn.ModuleList, model: MoRModel, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Run `layers` over h [B, n, d] whose tokens sit at `positions` [B, n] (sorted per row)."""
    b, n, d = h.shape
    cos, sin = model.rope(positions.reshape(-1), h.dtype)
    x = h.reshape(b * n, d)
    attend = _causal_rows(b, n)
    for layer in layers:
        x = layer(x, cos, sin, attend)
    return x.view(b, n, d)


def topk_forward(model: MoRModel, input_ids: torch.Tensor, capacities: list[float] | None = None) -> ReferenceOutput:
    """`reference_forward(model, input_ids [B, T], routing="topk", capacities=capacities)`,
    gathered (see module doc)."""
    if not supports(model):
        raise ValueError("topk_forward needs expert-choice routing with kv_mode 'recursion'")
    mor = model.config.mor
    capacities = capacities or mor.capacities
    b, t = input_ids.shape
    device = input_ids.device
    positions = torch.arange(t, device=device).expand(b, t)
    h = _run_layers(model.prologue, model, model.embed_tokens(input_ids), positions)
    out = ReferenceOutput(logits=None, depths=torch.zeros(b, t, dtype=torch.long, device=device), hidden=None)
    taking = torch.ones(b, t, dtype=torch.bool, device=device)
    d = h.shape[-1]
    for r in range(1, mor.num_recursions + 1):
        raw = model.expert_router_logit(r, h)
        out.router_logits.append(raw)
        if r > 1:
            taking = taking & expert_topk_select(raw, taking, capacities[r - 1])
        out.selected.append(taking)
        out.depths += taking.long()
        k = int(taking[0].sum())
        if not bool((taking.sum(-1) == k).all()):
            raise AssertionError("top-k selected a different number of tokens per row")
        idx = taking.nonzero()[:, 1].view(b, k)           # row-major: positions sorted per row
        index = idx[..., None].expand(b, k, d)
        h_sel = h.gather(1, index)
        x = _run_layers(model.block, model, h_sel, idx)
        gate = expert_gate(raw.gather(1, idx), mor).to(h.dtype)
        h = h.scatter(1, index, h_sel + gate[..., None] * x)
    h = _run_layers(model.epilogue, model, h, positions)
    out.hidden = h
    out.logits = model.logits(h)
    return out
