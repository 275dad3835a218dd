"""Executes the three kinds of work of an engine tick on the model, over flat token batches:

- `prologue(chunks)`: embed new chunks, run the unique first layer(s) (stage-0 K/V), place the
  hidden states in the persistent hidden-state pool; token choice decides depths here.
- `block_step(chunks)`: ONE pass of the shared block over every active token of every chunk, at
  whatever recursion depth each sits: gather rows from the pool, each token reads/writes the K/V
  pages of its own (sequence, depth), RoPE at its original position; gate the update, ask the
  routers who continues, scatter rows back.
- `epilogue(chunks, rows)`: unique last layer(s) over whole chunks, final norm, LM head.

The hot-path primitives (row gather/scatter, paged K/V store, paged attention) come from the
`kernels` package: the torch reference on CPU, the Triton kernels on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from morserve.engine.kv_cache import BlockManager, build_tables, slot_mapping
from morserve.engine.sequence import Chunk
from morserve.model.mor import MoRModel
from morserve.model.routing import expert_gate, expert_takes, token_choice


@dataclass
class StepStats:
    """What one block step did: tokens per depth and exits per depth (index d-1 = depth d)."""

    occupancy: list[int]
    exits: list[int]


class ModelRunner:
    def __init__(self, model: MoRModel, blocks: BlockManager, pool_size: int) -> None:
        self.model = model
        self.cfg = model.config
        self.mor = model.config.mor
        self.blocks = blocks
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = self.cfg
        shape = (blocks.num_pages, blocks.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.hidden = torch.zeros(pool_size, cfg.hidden_size, dtype=self.dtype, device=self.device)
        # token choice keeps each token's state at entry to the recursions (h_entry)
        self.entry = torch.zeros_like(self.hidden) if self.mor.router == "token" else None
        self.free_slots = list(range(pool_size - 1, -1, -1))
        self.scale = cfg.head_dim ** -0.5

    # ---- hidden-state pool -----------------------------------------------------------------
    def alloc_slots(self, n: int) -> torch.Tensor:
        if n > len(self.free_slots):
            raise RuntimeError(f"hidden-state pool exhausted: need {n}, {len(self.free_slots)} free")
        return torch.tensor([self.free_slots.pop() for _ in range(n)], dtype=torch.long, device=self.device)

    def release_slots(self, slots: torch.Tensor) -> None:
        self.free_slots.extend(slots.tolist())

    # ---- attention callback -----------------------------------------------------------------
    def _attend(self, tables: torch.Tensor, rows: torch.Tensor, entries: torch.Tensor,
                kv_lens: torch.Tensor, layer: int):
        """Attention for one layer: store this batch's K/V (entries >= 0), then paged attention."""
        bs = self.blocks.block_size
        slots = slot_mapping(tables, rows, entries, layer, bs)
        layer_tables = tables[:, :, layer].contiguous()

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kernels.store_kv(k, v, self.k_cache, self.v_cache, slots)
            return kernels.paged_attention(q, self.k_cache, self.v_cache, layer_tables, rows,
                                           kv_lens, self.scale)
        return attend

    def _stage0(self, chunks: list[Chunk]):
        """Tables and per-token metadata for stage 0 (every token; entry index = position)."""
        positions = torch.cat([torch.arange(c.start, c.end) for c in chunks]).to(self.device)
        rows = torch.cat([torch.full((c.n,), g, dtype=torch.int32) for g, c in enumerate(chunks)])
        tables = build_tables([self.blocks.block_table(c.seq.seq_id, 0) for c in chunks],
                              self.blocks.layers_per_stage[0], self.device)
        return positions, rows.to(self.device), tables

    # ---- the three kinds of work ------------------------------------------------------------
    @torch.inference_mode()
    def prologue(self, chunks: list[Chunk]) -> None:
        """Chunks must have their stage-0 entries reserved (BlockManager.append)."""
        model = self.model
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long, device=self.device)
        positions, rows, tables = self._stage0(chunks)
        h = model.embed_tokens(ids)
        cos, sin = model.rope(positions, self.dtype)
        entries, kv_lens = positions, (positions + 1).to(torch.int32)
        for i, layer in enumerate(model.prologue):
            h = layer(h, cos, sin, self._attend(tables, rows, entries, kv_lens, i))
        offset = 0
        for chunk in chunks:
            chunk.slots = self.alloc_slots(chunk.n)
            chunk.depth = 1
            chunk.active = torch.ones(chunk.n, dtype=torch.bool)
            chunk.taken = torch.zeros(chunk.n, dtype=torch.long)
            part = h[offset: offset + chunk.n]
            kernels.scatter_rows(self.hidden, chunk.slots, part)
            if self.mor.router == "token":
                depth, weight = token_choice(model.token_router_logits(part), self.mor)
                chunk.target_depth, chunk.gate_weight = depth.cpu(), weight
                kernels.scatter_rows(self.entry, chunk.slots, part)
            offset += chunk.n

    def block_pages_needed(self, chunks: list[Chunk]) -> dict[int, int]:
        """Pages each sequence needs for the next block step of its chunk."""
        need = {}
        for c in chunks:
            stage = self._write_stage(c.depth)
            if stage is not None:
                need[c.seq.seq_id] = self.blocks.pages_needed(c.seq.seq_id, stage, c.num_active)
        return need

    def _write_stage(self, depth: int) -> int | None:
        if self.mor.kv_mode == "share_first":
            return 1 if depth == 1 else None
        return depth

    @torch.inference_mode()
    def block_step(self, chunks: list[Chunk]) -> StepStats:
        """One pass of the shared block over the active tokens of `chunks` (any mix of depths)."""
        model, mor, nr = self.model, self.mor, self.mor.num_recursions
        occupancy, exits = [0] * nr, [0] * nr
        parts, tables_src = [], []
        for g, c in enumerate(chunks):
            idx = c.active.nonzero().squeeze(1)
            m = idx.numel()
            positions = c.start + idx
            stage = self._write_stage(c.depth)
            if stage is not None:
                first = self.blocks.append(c.seq.seq_id, stage, m)
                entries = first + torch.arange(m)   # compact, in position order
                kv_lens = entries + 1
            else:   # share-first, deeper recursion: read the depth-1 entries, write nothing
                entries = torch.full((m,), -1, dtype=torch.long)
                kv_lens = positions + 1
            read_stage = 1 if mor.kv_mode == "share_first" else c.depth
            tables_src.append(self.blocks.block_table(c.seq.seq_id, read_stage))
            parts.append((idx, positions, entries, kv_lens, torch.full((m,), g, dtype=torch.int32)))
            occupancy[c.depth - 1] += m
        idx_all = [p[0] for p in parts]
        positions = torch.cat([p[1] for p in parts]).to(self.device)
        entries = torch.cat([p[2] for p in parts]).to(self.device)
        kv_lens = torch.cat([p[3] for p in parts]).to(self.device, torch.int32)
        rows = torch.cat([p[4] for p in parts]).to(self.device)
        slots = torch.cat([c.slots[i] for c, i in zip(chunks, idx_all)])
        tables = build_tables(tables_src, self.blocks.layers_per_stage[1], self.device)
        depth_of = torch.cat([torch.full((i.numel(),), c.depth, dtype=torch.long)
                              for c, i in zip(chunks, idx_all)])

        h = kernels.gather_rows(self.hidden, slots)
        cos, sin = model.rope(positions, self.dtype)
        x = h
        for j, layer in enumerate(model.block):
            x = layer(x, cos, sin, self._attend(tables, rows, entries, kv_lens, j))

        if mor.router == "expert":
            gates = torch.empty(h.shape[0], dtype=torch.float32, device=self.device)
            for d in depth_of.unique().tolist():
                sel = (depth_of == d).to(self.device)
                gates[sel] = expert_gate(model.expert_router_logit(d, h[sel]), mor)
            new_h = h + gates[:, None].to(h.dtype) * x
        elif mor.router == "token":
            target = torch.cat([c.target_depth[i] for c, i in zip(chunks, idx_all)])
            weight = torch.cat([c.gate_weight[i.to(c.gate_weight.device)] for c, i in zip(chunks, idx_all)])
            final = (target == depth_of).to(self.device)
            entry = kernels.gather_rows(self.entry, slots)
            new_h = torch.where(final[:, None], entry + weight[:, None].to(h.dtype) * x, x)
        else:
            new_h = x
        kernels.scatter_rows(self.hidden, slots, new_h)

        cont = torch.zeros(h.shape[0], dtype=torch.bool)
        for d in depth_of.unique().tolist():
            if d >= nr:
                continue
            sel = depth_of == d
            if mor.router == "expert":
                raw = model.expert_router_logit(d + 1, new_h[sel.to(self.device)])
                cont[sel] = expert_takes(raw, mor, d + 1).cpu()
            elif mor.router == "token":
                cont[sel] = target[sel] > d
            else:
                cont[sel] = True
        offset = 0
        for c, i in zip(chunks, idx_all):
            m = i.numel()
            c_cont = cont[offset: offset + m]
            c.taken[i] += 1
            c.active[i] = c_cont
            exits[c.depth - 1] += int((~c_cont).sum())
            c.depth += 1
            offset += m
        return StepStats(occupancy, exits)

    @torch.inference_mode()
    def epilogue(self, chunks: list[Chunk], logit_rows: list[list[int]]) -> list[torch.Tensor]:
        """Last layer(s), norm and LM head; returns float32 logits [len(rows), V] per chunk and
        releases the chunks' pool rows."""
        model = self.model
        positions, rows, tables = self._stage0(chunks)
        slots = torch.cat([c.slots for c in chunks])
        h = kernels.gather_rows(self.hidden, slots)
        cos, sin = model.rope(positions, self.dtype)
        entries, kv_lens = positions, (positions + 1).to(torch.int32)
        base = len(model.prologue)
        for i, layer in enumerate(model.epilogue):
            h = layer(h, cos, sin, self._attend(tables, rows, entries, kv_lens, base + i))
        out, offset = [], 0
        for c, want in zip(chunks, logit_rows):
            if want:
                sel = torch.tensor(want, dtype=torch.long, device=self.device) + offset
                out.append(model.logits(h[sel]).float())
            else:
                out.append(torch.empty(0, self.cfg.vocab_size))
            offset += c.n
            self.release_slots(c.slots)
        return out
