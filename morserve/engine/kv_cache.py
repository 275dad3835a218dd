"""Paged KV cache with per-(sequence, cache stage) block tables.

Cache stages: stage 0 holds the prologue and epilogue layers (every token has an entry); stage d
(1..Nr) holds the shared block's layers at recursion depth d. With recursion-wise caching only
tokens that took depth d get a depth-d entry (entries are stored compactly, in position order);
with share-first only stage 1 exists.

Storage is one pool of *pages*: a page holds `block_size` tokens of K and V for ONE layer, so
stages with different layer counts share a single free list and memory moves freely between
depths. A logical block of a stage with m layers is m pages (one per layer), so a stage's block
table is [num_blocks, m] page ids and layer l of the stage reads column l. Tables are numpy arrays
grown by doubling, so a tick's padded table batch is built by slice copies, not Python loops.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

import kernels


class OutOfPages(RuntimeError):
    """Raised when an allocation needs more free pages than the pool holds."""


class StageCache:
    """One sequence's entries at one cache stage: `pages[:num_blocks]` is its block table
    ([num_blocks, layers] page ids) and `length` the entries written or reserved."""

    def __init__(self, layers: int) -> None:
        self.pages = np.zeros((4, layers), dtype=np.int32)
        self.num_blocks = 0
        self.length = 0
        self.version = 0              # bumped whenever the block list changes (for table mirrors)

    @property
    def table(self) -> np.ndarray:
        return self.pages[: self.num_blocks]

    def add_block(self, page_ids: list[int]) -> None:
        if self.num_blocks == len(self.pages):
            self.pages = np.concatenate([self.pages, np.zeros_like(self.pages)])
        self.pages[self.num_blocks] = page_ids
        self.num_blocks += 1
        self.version += 1


class BlockManager:
    """Page allocator and block tables. `layers_per_stage[s]` is the layer count of stage s."""

    def __init__(self, num_pages: int, block_size: int, layers_per_stage: list[int]) -> None:
        if num_pages < 1 or block_size < 1:
            raise ValueError(f"need num_pages >= 1 and block_size >= 1, got {num_pages}, {block_size}")
        self.num_pages = num_pages
        self.block_size = block_size
        self.layers_per_stage = list(layers_per_stage)
        self.free_pages: list[int] = list(range(num_pages - 1, -1, -1))
        self.tables: dict[tuple[int, int], StageCache] = {}
        self.used_blocks = [0] * len(self.layers_per_stage)      # blocks held, per stage

    # ---- accounting ----------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    def pages_needed(self, seq_id: int, stage: int, new_entries: int) -> int:
        """Pages that appending `new_entries` entries to (seq, stage) would allocate."""
        layers = self.layers_per_stage[stage]
        if layers == 0 or new_entries <= 0:
            return 0
        cache = self.tables.get((seq_id, stage))
        length, have = (cache.length, cache.num_blocks) if cache else (0, 0)
        need_blocks = -(-(length + new_entries) // self.block_size)
        return max(0, need_blocks - have) * layers

    def pages_for_tokens(self, stage: int, entries: int) -> int:
        """Pages a fresh sequence needs for `entries` entries at `stage`."""
        return -(-entries // self.block_size) * self.layers_per_stage[stage]

    def blocks_used_per_stage(self) -> list[int]:
        return list(self.used_blocks)

    def usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_pages

    # ---- allocation ----------------------------------------------------------------------
    def _cache(self, seq_id: int, stage: int) -> StageCache:
        cache = self.tables.get((seq_id, stage))
        if cache is None:
            cache = self.tables[(seq_id, stage)] = StageCache(self.layers_per_stage[stage])
        return cache

    def _add_block(self, cache: StageCache, stage: int) -> None:
        cache.add_block([self.free_pages.pop() for _ in range(self.layers_per_stage[stage])])
        self.used_blocks[stage] += 1

    def append(self, seq_id: int, stage: int, new_entries: int) -> int:
        """Reserve `new_entries` entries at the end of (seq, stage); returns the first entry index."""
        needed = self.pages_needed(seq_id, stage, new_entries)
        if needed > self.num_free_pages:
            raise OutOfPages(f"need {needed} pages, {self.num_free_pages} free")
        cache = self._cache(seq_id, stage)
        while cache.num_blocks * self.block_size < cache.length + new_entries and self.layers_per_stage[stage]:
            self._add_block(cache, stage)
        start = cache.length
        cache.length += new_entries
        return start

    def reserve_ahead(self, seq_ids: list[int], new_entries: list[int]) -> bool:
        """Allocate pages so that stage s of every listed sequence can take new_entries[s] more
        entries, without reserving the entries (the device decode loop writes them and reports the
        lengths through commit_lengths). All or nothing: False when the free pages fall short."""
        plan, total, bs, get = [], 0, self.block_size, self.tables.get
        stages = [(stage, layers, new_entries[stage]) for stage, layers in enumerate(self.layers_per_stage)
                  if layers and new_entries[stage]]
        for seq_id in seq_ids:
            for stage, layers, entries in stages:
                cache = get((seq_id, stage))
                blocks = (-(-(cache.length + entries) // bs) - cache.num_blocks if cache
                          else -(-entries // bs))
                if blocks > 0:
                    plan.append((seq_id, stage, blocks))
                    total += blocks * layers
        if total > self.num_free_pages:
            return False
        for seq_id, stage, blocks in plan:
            cache = self._cache(seq_id, stage)
            for _ in range(blocks):
                self._add_block(cache, stage)
        return True

    def commit_lengths(self, seq_id: int, lengths: list[int], trim: bool = True) -> None:
        """Set the entries per stage written by the decode loop (within the pages held) and, with
        `trim`, give back the pages beyond what they occupy (not while another loop, which may
        write past these lengths, is still running)."""
        for stage, length in enumerate(lengths):
            cache = self._cache(seq_id, stage)
            keep = -(-length // self.block_size) if self.layers_per_stage[stage] else 0
            if length < 0 or keep > cache.num_blocks:
                raise ValueError(f"{length} entries exceed the {cache.num_blocks} blocks of ({seq_id}, {stage})")
            cache.length = length
            if trim and cache.num_blocks > keep:
                self.free_pages.extend(cache.pages[keep: cache.num_blocks].ravel().tolist())
                self.used_blocks[stage] -= cache.num_blocks - keep
                cache.num_blocks = keep
                cache.version += 1

    def length(self, seq_id: int, stage: int) -> int:
        cache = self.tables.get((seq_id, stage))
        return cache.length if cache else 0

    def block_table(self, seq_id: int, stage: int) -> np.ndarray:
        """[num_blocks, layers] page ids of (seq, stage) (empty if it holds nothing)."""
        cache = self.tables.get((seq_id, stage))
        return cache.table if cache else np.zeros((0, self.layers_per_stage[stage]), dtype=np.int32)

    def pages_held(self, seq_id: int) -> int:
        """Pages the sequence holds over all stages."""
        return sum(self.block_table(seq_id, stage).size for stage in range(len(self.layers_per_stage)))

    def free_sequence(self, seq_id: int) -> None:
        """Return every page of the sequence, at all stages, to the free list."""
        for stage in range(len(self.layers_per_stage)):
            cache = self.tables.pop((seq_id, stage), None)
            if cache:
                self.free_pages.extend(cache.table.ravel().tolist())
                self.used_blocks[stage] -= cache.num_blocks

    def all_free(self) -> bool:
        return self.num_free_pages == self.num_pages and not self.tables


class PagedKVCache:
    """The device side: K and V page pools [num_pages, block_size, Hkv, D] shared by all layers."""

    def __init__(self, num_pages: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_pages, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.scale = head_dim ** -0.5

    def attend_fns(self, tables: torch.Tensor, rows: torch.Tensor, entries: torch.Tensor,
                   kv_lens: torch.Tensor, columns: range) -> list[Callable]:
        """Attention callbacks for the layers stored in table columns `columns` (they apply RoPE,
        see layers.AttendFn): RoPE on the un-roped q/k fused with the store of the batch's K/V at
        `entries` (>= 0) of each row's table row, then paged attention over each row's first
        kv_lens entries. The slot mapping and per-layer tables of every layer are built here,
        once for the phase. Pure tensor ops: safe inside CUDA-graph capture."""
        slots = slot_mapping(tables, rows, entries, columns, self.block_size)
        layer_tables = tables[:, :, columns.start: columns.stop].permute(2, 0, 1).contiguous()
        rows, kv_lens = rows.to(torch.int32), kv_lens.to(torch.int32)
        return [self._attend(slots[i], layer_tables[i], rows, kv_lens) for i in range(len(columns))]

    def _attend(self, slots: torch.Tensor, layer_tables: torch.Tensor, rows: torch.Tensor,
                kv_lens: torch.Tensor) -> Callable:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
            q, _ = kernels.store_kv_rope(q, k, v, cos, sin, self.k, self.v, slots)
            return kernels.paged_attention(q, self.k, self.v, layer_tables, rows, kv_lens, self.scale)
        attend.fuses_rope = True
        return attend


def slot_mapping(tables: torch.Tensor, rows: torch.Tensor, entries: torch.Tensor,
                 columns: range, block_size: int) -> torch.Tensor:
    """[len(columns), T] flat slots (page * block_size + offset) of entry `entries[t]` in table row
    `rows[t]`, for each layer column; entries < 0 map to -1 (nothing written). tables: [G, M, layers]."""
    safe = entries.clamp(min=0)
    pages = tables[rows, safe // block_size][:, columns.start: columns.stop]          # [T, L]
    slots = pages.long() * block_size + (safe % block_size)[:, None]
    return torch.where(entries[:, None] >= 0, slots, -1).t().contiguous()


def build_tables(tables: list[np.ndarray], layers: int, out: np.ndarray | None = None) -> np.ndarray:
    """Pad per-group block tables ([blocks, layers] page ids each) into one int32 array
    [G, M, layers] (M = the widest table), or into the front of `out` when given."""
    if out is None:
        width = max([len(t) for t in tables] + [1])
        out = np.zeros((len(tables), width, max(layers, 1)), dtype=np.int32)
    for g, table in enumerate(tables):
        if len(table):
            out[g, : len(table)] = table
    return out
