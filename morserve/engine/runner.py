"""The per-tick driver of the tick's phases (tick.py): the batch state lives on the host, in the
chunks in flight, and each phase's device metadata is built from it with numpy / Python lists
and copied to the device once per tensor.

- `prologue(chunks)`: new chunks (prompt chunks or freshly sampled tokens) enter the pool;
- `block_step(chunks)`: one block pass over every active token of every chunk, at whatever
  depth each sits; the only device-to-host copy is its continue mask (the per-depth counts
  follow on the host from the chunks' depths);
- `epilogue(chunks, rows)`: whole chunks through the last layer(s), logits of the requested rows.

On CUDA the block pass replays CUDA graphs for padded token counts (cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from morserve.engine.cuda_graphs import GraphedBlockPass
from morserve.engine.kv_cache import BlockManager, PagedKVCache, build_tables
from morserve.engine.sequence import Chunk
from morserve.engine.stages import CacheStages
from morserve.engine.tick import DEPTH, ENTRY, GROUP, KV_LEN, NUM_FIELDS, POSITION, SLOT, TARGET, TickPhases
from morserve.model.mor import MoRModel


@dataclass
class StepStats:
    """What one block step did: tokens per depth and exits per depth (index d-1 = depth d)."""

    occupancy: list[int]
    exits: list[int]


class ModelRunner:
    """`pool_size` rows of hidden state (one per token in flight) plus one scratch row."""

    def __init__(self, model: MoRModel, blocks: BlockManager, stages: CacheStages, pool_size: int,
                 max_model_len: int) -> None:
        self.model = model
        self.mor = model.config.mor
        self.blocks, self.stages = blocks, stages
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model.config
        with torch.inference_mode():
            rope = model.rope(torch.arange(max_model_len, device=self.device), self.dtype)
        self.kv = PagedKVCache(blocks.num_pages, blocks.block_size, cfg.num_key_value_heads, cfg.head_dim,
                               self.dtype, self.device, rope)
        blocks.copy_pages = self.kv.copy_pages
        self.pool_size = pool_size
        self.phases = TickPhases(model, self.kv, stages, pool_size)
        self.graphed: GraphedBlockPass | None = None
        self.free_slots = list(range(pool_size - 1, -1, -1))

    def use_graphs(self, sizes: list[int], max_model_len: int, capture: bool) -> None:
        """Run block passes of up to max(sizes) tokens through static padded buffers, replayed
        from CUDA graphs when `capture` (CUDA only), eagerly otherwise."""
        width = -(-max_model_len // self.blocks.block_size)
        self.graphed = GraphedBlockPass(self.phases, sizes, width, self.blocks.layers_per_stage[1], capture=capture)

    # ---- hidden-state pool -----------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def alloc_slots(self, n: int) -> list[int]:
        if n > len(self.free_slots):
            raise RuntimeError(f"hidden-state pool exhausted: need {n}, {len(self.free_slots)} free")
        taken = self.free_slots[-n:]
        del self.free_slots[-n:]
        return taken[::-1]

    def release_slots(self, slots: list[int]) -> None:
        self.free_slots.extend(slots)

    def _slots_tensor(self, chunks: list[Chunk]) -> torch.Tensor:
        return torch.tensor([s for c in chunks for s in c.slots], dtype=torch.long).to(self.device)

    def _stage0(self, chunks: list[Chunk], columns: range):
        """The attention callbacks of stage-0 layers `columns` over whole chunks."""
        sizes = [c.n for c in chunks]
        positions = torch.from_numpy(np.concatenate([np.arange(c.start, c.end) for c in chunks])).to(self.device)
        groups = torch.from_numpy(np.repeat(np.arange(len(chunks)), sizes)).to(self.device)
        tables = build_tables([self.blocks.block_table(c.seq.seq_id, 0) for c in chunks],
                              self.blocks.layers_per_stage[0])
        return self.phases.stage0_attention(torch.from_numpy(tables).to(self.device), groups, positions, columns)

    # ---- the three phases ------------------------------------------------------------------
    @torch.inference_mode()
    def prologue(self, chunks: list[Chunk]) -> None:
        """Chunks must have their stage-0 entries reserved (BlockManager.append)."""
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long).to(self.device)
        for chunk in chunks:
            chunk.seq.embedded = max(chunk.seq.embedded, chunk.end)
            chunk.slots = self.alloc_slots(chunk.n)
            chunk.depth = 1
            chunk.active = [True] * chunk.n
            chunk.num_active = chunk.n
            chunk.taken = [0] * chunk.n
        slots = self._slots_tensor(chunks)
        self.phases.set_routing(slots, [cap for c in chunks for cap in c.seq.caps.span(c.start, c.end)],
                                [c.seq.request.router_threshold for c in chunks for _ in range(c.n)])
        target = self.phases.prologue(ids, slots, self._stage0(chunks, self.phases.prologue_columns))
        if target is not None:
            target = target.tolist()
            offset = 0
            for chunk in chunks:
                chunk.target_depth = target[offset: offset + chunk.n]
                offset += chunk.n

    def block_pages_needed(self, chunks: list[Chunk]) -> dict[int, int]:
        """Pages each sequence needs for the next block step of its chunk."""
        need = {}
        for c in chunks:
            stage = self.stages.write_stage(c.depth)
            if stage is not None:
                need[c.seq.seq_id] = self.blocks.pages_needed(c.seq.seq_id, stage, c.num_active)
        return need

    def _block_inputs(self, chunks: list[Chunk]) -> tuple[np.ndarray, list[np.ndarray], list]:
        """Host metadata [NUM_FIELDS, T] and block tables of a block step over `chunks` (reserving
        the K/V entries the step writes), plus each chunk's active token indices. Plain Python
        lists per token: a decode chunk costs a few list appends, not numpy calls."""
        fields: list[list[int]] = [[] for _ in range(NUM_FIELDS)]
        slots, positions, groups, entries, kv_lens, depths, targets = (fields[f] for f in (
            SLOT, POSITION, GROUP, ENTRY, KV_LEN, DEPTH, TARGET))
        tables, selections = [], []
        for g, c in enumerate(chunks):
            idx = range(c.n) if c.num_active == c.n else [i for i, a in enumerate(c.active) if a]
            m = len(idx)
            pos = [c.start + i for i in idx]
            slots += [c.slots[i] for i in idx]
            positions += pos
            groups += [g] * m
            depths += [c.depth] * m
            targets += [c.target_depth[i] for i in idx] if c.target_depth is not None else [0] * m
            stage = self.stages.write_stage(c.depth)
            if stage is not None:            # compact entries, in position order
                first = self.blocks.append(c.seq.seq_id, stage, m)
                entries += range(first, first + m)
                kv_lens += range(first + 1, first + m + 1)
            else:                            # reads an earlier depth's entries up to its position
                entries += [-1] * m
                kv_lens += [p + 1 for p in pos]
            tables.append(self.blocks.block_table(c.seq.seq_id, self.stages.read_stage(c.depth)))
            selections.append(idx)
        return np.array(fields, dtype=np.int64), tables, selections

    @torch.inference_mode()
    def block_step(self, chunks: list[Chunk]) -> StepStats:
        """One pass of the shared block over the active tokens of `chunks` (any mix of depths)."""
        meta, tables, selections = self._block_inputs(chunks)
        width = max(len(t) for t in tables)
        layers = self.blocks.layers_per_stage[1]
        if self.graphed is not None and self.graphed.fits(meta.shape[1], width):
            cont = self.graphed(meta, build_tables(tables, layers))
        else:
            cont = self.phases.block(torch.from_numpy(meta).to(self.device),
                                     torch.from_numpy(build_tables(tables, layers)).to(self.device))
        cont = cont.tolist()                                          # the one device-to-host copy
        nr = self.mor.num_recursions
        occupancy, exits = [0] * nr, [0] * nr
        offset = 0
        for c, idx in zip(chunks, selections):
            kept = 0
            for i, keep in zip(idx, cont[offset: offset + len(idx)]):
                c.taken[i] += 1
                c.active[i] = keep
                kept += keep
            occupancy[c.depth - 1] += len(idx)
            exits[c.depth - 1] += len(idx) - kept
            c.num_active = kept
            c.depth += 1
            offset += len(idx)
        return StepStats(occupancy, exits)

    @torch.inference_mode()
    def epilogue(self, chunks: list[Chunk], logit_rows: list[list[int]]) -> torch.Tensor:
        """Last layer(s) over whole chunks, then norm and LM head over the requested rows of every
        chunk (row indices within each chunk) in one matmul; returns the logits [sum of rows, V]
        on the device, chunk by chunk, and releases the chunks' pool rows."""
        attends = self._stage0(chunks, self.phases.epilogue_columns)
        starts = np.cumsum([0] + [c.n for c in chunks[:-1]])
        want = np.concatenate([np.asarray(rows, dtype=np.int64) + s for rows, s in zip(logit_rows, starts)])
        logits = self.phases.epilogue(self._slots_tensor(chunks), attends, torch.from_numpy(want).to(self.device))
        for c in chunks:
            self.release_slots(c.slots)
        return logits
