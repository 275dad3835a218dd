"""Executes the three kinds of work of an engine tick on the model, over flat token batches:

- `prologue(chunks)`: embed new chunks, run the unique first layer(s) (stage-0 K/V), place the
  hidden states in the persistent hidden-state pool; token choice decides depths here.
- `block_step(chunks)`: ONE pass of the shared block over every active token of every chunk, at
  whatever recursion depth each sits (see block_pass.py); the routers decide who continues.
- `epilogue(chunks, rows)`: unique last layer(s) over whole chunks, then final norm and LM head
  over the requested rows of all chunks in one matmul.

Per-token metadata is built on the host with numpy (block tables are numpy arrays, see
kv_cache.py) and copied to the device once per tensor; the only device-to-host copy of a block
step is its continue mask. On CUDA the block pass replays CUDA graphs for padded token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import kernels
from morserve.engine.block_pass import DEPTH, ENTRY, GROUP, KV_LEN, NUM_FIELDS, POSITION, SLOT, TARGET, BlockPass
from morserve.engine.cuda_graphs import GraphedBlockPass
from morserve.engine.kv_cache import BlockManager, PagedKVCache, build_tables
from morserve.engine.sequence import Chunk
from morserve.model.mor import MoRModel
from morserve.model.routing import token_choice


@dataclass
class StepStats:
    """What one block step did: tokens per depth and exits per depth (index d-1 = depth d)."""

    occupancy: list[int]
    exits: list[int]


class ModelRunner:
    """`pool_size` rows of hidden state (one per token in flight) plus one scratch row."""

    def __init__(self, model: MoRModel, blocks: BlockManager, pool_size: int) -> None:
        self.model = model
        self.cfg = model.config
        self.mor = model.config.mor
        self.blocks = blocks
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = self.cfg
        self.kv = PagedKVCache(blocks.num_pages, blocks.block_size, cfg.num_key_value_heads, cfg.head_dim,
                               self.dtype, self.device)
        blocks.copy_pages = self.kv.copy_pages
        self.pool_size = pool_size
        self.hidden = torch.zeros(pool_size + 1, cfg.hidden_size, dtype=self.dtype, device=self.device)
        entry = gate = None
        if self.mor.router == "token":      # each token's state at entry to the recursions, final gate
            entry = torch.zeros_like(self.hidden)
            gate = torch.zeros(pool_size + 1, 1, dtype=torch.float32, device=self.device)
        self.entry, self.gate = entry, gate
        # each pool row's routing overrides (engine/depth.py), written when its token enters
        self.depth_cap = torch.full((pool_size + 1,), self.mor.num_recursions, dtype=torch.long, device=self.device)
        self.threshold = torch.full((pool_size + 1,), self.mor.routing_threshold if self.mor.router == "expert"
                                    else 0.0, dtype=torch.float32, device=self.device)
        self.block_pass = BlockPass(model, self.kv, self.hidden, entry, gate, self.depth_cap, self.threshold)
        self.graphed: GraphedBlockPass | None = None
        self.free_slots = list(range(pool_size - 1, -1, -1))

    def use_graphs(self, sizes: list[int], max_model_len: int, capture: bool) -> None:
        """Run block passes of up to max(sizes) tokens through static padded buffers, replayed
        from CUDA graphs when `capture` (CUDA only), eagerly otherwise."""
        width = -(-max_model_len // self.blocks.block_size)
        self.graphed = GraphedBlockPass(self.block_pass, sizes, width, self.blocks.layers_per_stage[1],
                                        scratch_slot=self.pool_size, capture=capture)

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

    def set_routing(self, slots: torch.Tensor, caps: list[int], thresholds: list[float]) -> torch.Tensor:
        """Write the depth caps and expert thresholds of the tokens entering pool rows `slots`;
        returns the caps on the device."""
        caps_t = torch.tensor(caps, dtype=torch.long).to(self.device)
        self.depth_cap.index_copy_(0, slots, caps_t)
        self.threshold.index_copy_(0, slots, torch.tensor(thresholds, dtype=torch.float32).to(self.device))
        return caps_t

    # ---- stage 0 (prologue / epilogue) -----------------------------------------------------
    def _stage0(self, chunks: list[Chunk]):
        """Device metadata for the stage-0 layers over whole chunks (entry index = position)."""
        sizes = [c.n for c in chunks]
        positions = np.concatenate([np.arange(c.start, c.end) for c in chunks])
        rows = np.repeat(np.arange(len(chunks), dtype=np.int32), sizes)
        tables = build_tables([self.blocks.block_table(c.seq.seq_id, 0) for c in chunks],
                              self.blocks.layers_per_stage[0])
        positions = torch.from_numpy(positions).to(self.device)
        return (positions, torch.from_numpy(rows).to(self.device), torch.from_numpy(tables).to(self.device),
                (positions + 1).to(torch.int32))

    def _stage0_layers(self, layers, first: int, h: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
        positions, rows, tables, kv_lens = self._stage0(chunks)
        cos, sin = self.model.rope(positions, self.dtype)
        for i, layer in enumerate(layers):
            h = layer(h, cos, sin, self.kv.attend_fn(tables, rows, positions, kv_lens, first + i))
        return h

    # ---- the three kinds of work ------------------------------------------------------------
    @torch.inference_mode()
    def prologue(self, chunks: list[Chunk]) -> None:
        """Chunks must have their stage-0 entries reserved (BlockManager.append)."""
        model = self.model
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long).to(self.device)
        h = self._stage0_layers(model.prologue, 0, model.embed_tokens(ids), chunks)
        for chunk in chunks:
            chunk.seq.embedded = max(chunk.seq.embedded, chunk.end)
            chunk.slots = self.alloc_slots(chunk.n)
            chunk.depth = 1
            chunk.active = [True] * chunk.n
            chunk.num_active = chunk.n
            chunk.taken = [0] * chunk.n
        slots = self._slots_tensor(chunks)
        kernels.scatter_rows(self.hidden, slots, h)
        caps = self.set_routing(slots, [cap for c in chunks for cap in c.seq.caps.span(c.start, c.end)],
                                [c.seq.request.router_threshold for c in chunks for _ in range(c.n)])
        if self.mor.router == "token":
            depth, weight = token_choice(model.token_router_logits(h), self.mor, max_depth=caps)
            kernels.scatter_rows(self.entry, slots, h)
            self.gate.index_copy_(0, slots, weight[:, None].float())
            depth = depth.tolist()
            offset = 0
            for chunk in chunks:
                chunk.target_depth = depth[offset: offset + chunk.n]
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

    def _block_inputs(self, chunks: list[Chunk]) -> tuple[np.ndarray, list[np.ndarray], list]:
        """Host metadata [NUM_FIELDS, T] and block tables of a block step over `chunks` (reserving
        the K/V entries the step writes), plus each chunk's active token indices. Plain Python
        lists per token: a decode chunk costs a few list appends, not numpy calls."""
        share_first = self.mor.kv_mode == "share_first"
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
            targets += [c.target_depth[i] for i in idx] if self.mor.router == "token" else [0] * m
            stage = self._write_stage(c.depth)
            if stage is not None:            # compact entries, in position order
                first = self.blocks.append(c.seq.seq_id, stage, m)
                entries += range(first, first + m)
                kv_lens += range(first + 1, first + m + 1)
            else:                            # share-first, deeper recursion: read depth 1's entries
                entries += [-1] * m
                kv_lens += [p + 1 for p in pos]
            tables.append(self.blocks.block_table(c.seq.seq_id, 1 if share_first else c.depth))
            selections.append(idx)
        return np.array(fields, dtype=np.int64), tables, selections

    @torch.inference_mode()
    def block_step(self, chunks: list[Chunk]) -> StepStats:
        """One pass of the shared block over the active tokens of `chunks` (any mix of depths)."""
        nr = self.mor.num_recursions
        meta, tables, selections = self._block_inputs(chunks)
        width = max(len(t) for t in tables)
        layers = self.blocks.layers_per_stage[1]
        if self.graphed is not None and self.graphed.fits(meta.shape[1], width):
            cont = self.graphed(meta, build_tables(tables, layers))
        else:
            cont = self.block_pass(torch.from_numpy(meta).to(self.device),
                                   torch.from_numpy(build_tables(tables, layers)).to(self.device))
        cont = cont.tolist()
        occupancy, exits = [0] * nr, [0] * nr
        offset = 0
        for c, idx in zip(chunks, selections):
            m = len(idx)
            kept = 0
            for i, keep in zip(idx, cont[offset: offset + m]):
                c.taken[i] += 1
                c.active[i] = keep
                kept += keep
            c.num_active = kept
            occupancy[c.depth - 1] += m
            exits[c.depth - 1] += m - kept
            c.depth += 1
            offset += m
        return StepStats(occupancy, exits)

    @torch.inference_mode()
    def epilogue(self, chunks: list[Chunk], logit_rows: list[list[int]]) -> torch.Tensor:
        """Last layer(s) over whole chunks, then norm and LM head over the requested rows of every
        chunk (row indices within each chunk) in one matmul; returns the logits [sum of rows, V]
        on the device, chunk by chunk, and releases the chunks' pool rows."""
        model = self.model
        h = kernels.gather_rows(self.hidden, self._slots_tensor(chunks))
        h = self._stage0_layers(model.epilogue, len(model.prologue), h, chunks)
        starts = np.cumsum([0] + [c.n for c in chunks[:-1]])
        want = np.concatenate([np.asarray(rows, dtype=np.int64) + s for rows, s in zip(logit_rows, starts)])
        logits = model.logits(h.index_select(0, torch.from_numpy(want).to(self.device)))
        for c in chunks:
            self.release_slots(c.slots)
        return logits
