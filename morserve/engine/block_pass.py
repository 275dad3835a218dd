"""One pass of the shared recursion block over a flat batch of tokens at mixed depths, as pure
tensor work on the device (no host sync, no data-dependent shapes), so that on CUDA it can be
captured once per padded batch size and replayed as a CUDA graph.

Inputs are a packed int64 metadata tensor `meta` [NUM_FIELDS, T] (one row per field below) and the
block tables [G, M, layers] of the (sequence, depth) groups. The pass gathers the tokens' hidden
rows from the persistent pool, runs the block's layers (each token stores its K/V at its own entry
of its group and attends to its group's first kv_len entries, RoPE at its original position),
gates the update, scatters the rows back, and returns whether each token continues to the next
recursion. Padding rows (slot = the pool's scratch row, entry -1, kv_len 0, depth Nr) compute
garbage that touches nothing but the scratch row.
"""

from __future__ import annotations

import torch

import kernels
from morserve.engine.kv_cache import PagedKVCache
from morserve.model.mor import MoRModel
from morserve.model.routing import expert_gate, expert_takes

# rows of the packed metadata tensor
SLOT, POSITION, GROUP, ENTRY, KV_LEN, DEPTH, TARGET = range(7)
NUM_FIELDS = 7


class BlockPass:
    """Callable `(meta [NUM_FIELDS, T] int64, tables [G, M, L] int32) -> continue [T] bool`.

    `hidden` is the hidden-state pool; token choice also reads `entry` (each token's state at
    entry to the recursions) and `gate` ([pool, 1] float32, the gate of its final recursion).
    `depth_cap` [pool] and `threshold` [pool] are each row's request overrides (engine/depth.py):
    no token continues past its cap, expert choice compares with its own threshold."""

    def __init__(self, model: MoRModel, kv: PagedKVCache, hidden: torch.Tensor,
                 entry: torch.Tensor | None, gate: torch.Tensor | None,
                 depth_cap: torch.Tensor, threshold: torch.Tensor) -> None:
        self.model, self.kv = model, kv
        self.mor = model.config.mor
        self.hidden, self.entry, self.gate = hidden, entry, gate
        self.depth_cap, self.threshold = depth_cap, threshold
        bias = self.mor.router_bias or [0.0] * self.mor.num_recursions
        self.bias = torch.tensor(bias, dtype=torch.float32, device=hidden.device)

    def __call__(self, meta: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        model, mor, nr = self.model, self.mor, self.mor.num_recursions
        slots, depth = meta[SLOT], meta[DEPTH]
        rows, kv_lens = meta[GROUP].to(torch.int32), meta[KV_LEN].to(torch.int32)
        h = kernels.gather_rows(self.hidden, slots)
        cos, sin = model.rope(meta[POSITION], h.dtype)
        x = h
        for j, layer in enumerate(model.block):
            x = layer(x, cos, sin, self.kv.attend_fn(tables, rows, meta[ENTRY], kv_lens, j))

        if mor.router == "expert":
            taken = (depth - 1)[:, None]
            gate = expert_gate(model.expert_router_logits(h).gather(1, taken).squeeze(1), mor)
            new_h = h + gate[:, None].to(h.dtype) * x
            following = depth.clamp(max=nr - 1)[:, None]            # 0-based index of router d+1
            raw = model.expert_router_logits(new_h).gather(1, following).squeeze(1)
            cont = ((depth < self.depth_cap.index_select(0, slots))
                    & expert_takes(raw, mor, following.squeeze(1) + 1, self.bias, self.threshold.index_select(0, slots)))
        elif mor.router == "token":
            target = meta[TARGET]
            final = (target == depth)[:, None]
            entry = kernels.gather_rows(self.entry, slots)
            weight = self.gate.index_select(0, slots).to(h.dtype)
            new_h = torch.where(final, entry + weight * x, x)
            cont = target > depth
        else:
            new_h = x
            cont = depth < self.depth_cap.index_select(0, slots)
        kernels.scatter_rows(self.hidden, slots, new_h)
        return cont
