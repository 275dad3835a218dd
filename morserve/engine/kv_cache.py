"""Paged KV cache with per-(sequence, cache stage) block tables.

Cache stages: stage 0 holds the prologue and epilogue layers (every token has an entry); stage d
(1..Nr) holds the shared block's layers at recursion depth d. With recursion-wise caching only
tokens that took depth d get a depth-d entry (entries are stored compactly, in position order);
with share-first only stage 1 exists.

Storage is one pool of *pages*: a page holds `block_size` tokens of K and V for ONE layer, so
stages with different layer counts share a single free list and memory moves freely between
depths. A logical block of a stage with m layers is m pages (one per layer), so a stage's block
table is [num_blocks, m] page ids and layer l of the stage reads column l.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class OutOfPages(RuntimeError):
    """Raised when an allocation needs more free pages than the pool holds."""


@dataclass
class StageCache:
    """One sequence's entries at one cache stage."""

    blocks: list[list[int]] = field(default_factory=list)  # per logical block: page id per layer
    length: int = 0                                         # entries written (or reserved)


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
        length, have = (cache.length, len(cache.blocks)) if cache else (0, 0)
        need_blocks = -(-(length + new_entries) // self.block_size)
        return max(0, need_blocks - have) * layers

    def pages_for_tokens(self, stage: int, entries: int) -> int:
        """Pages a fresh sequence needs for `entries` entries at `stage`."""
        return -(-entries // self.block_size) * self.layers_per_stage[stage]

    def blocks_used_per_stage(self) -> list[int]:
        used = [0] * len(self.layers_per_stage)
        for (_, stage), cache in self.tables.items():
            used[stage] += len(cache.blocks)
        return used

    def usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_pages

    # ---- allocation ----------------------------------------------------------------------
    def append(self, seq_id: int, stage: int, new_entries: int) -> int:
        """Reserve `new_entries` entries at the end of (seq, stage); returns the first entry index."""
        needed = self.pages_needed(seq_id, stage, new_entries)
        if needed > self.num_free_pages:
            raise OutOfPages(f"need {needed} pages, {self.num_free_pages} free")
        cache = self.tables.setdefault((seq_id, stage), StageCache())
        layers = self.layers_per_stage[stage]
        while len(cache.blocks) * self.block_size < cache.length + new_entries and layers:
            cache.blocks.append([self.free_pages.pop() for _ in range(layers)])
        start = cache.length
        cache.length += new_entries
        return start

    def length(self, seq_id: int, stage: int) -> int:
        cache = self.tables.get((seq_id, stage))
        return cache.length if cache else 0

    def block_table(self, seq_id: int, stage: int) -> list[list[int]]:
        cache = self.tables.get((seq_id, stage))
        return cache.blocks if cache else []

    def free_sequence(self, seq_id: int) -> None:
        """Return every page of the sequence, at all stages, to the free list."""
        for stage in range(len(self.layers_per_stage)):
            cache = self.tables.pop((seq_id, stage), None)
            if cache:
                for block in cache.blocks:
                    self.free_pages.extend(block)

    def all_free(self) -> bool:
        return self.num_free_pages == self.num_pages and not self.tables


def slot_mapping(tables: torch.Tensor, rows: torch.Tensor, entries: torch.Tensor,
                 layer: int, block_size: int) -> torch.Tensor:
    """Flat slot (page * block_size + offset) of entry `entries[t]` in table row `rows[t]`,
    column `layer`; entries < 0 map to -1 (nothing written). tables: [G, M, layers]."""
    safe = entries.clamp(min=0)
    pages = tables[rows, safe // block_size, layer]
    slots = pages.long() * block_size + safe % block_size
    return torch.where(entries >= 0, slots, torch.full_like(slots, -1))


def build_tables(block_lists: list[list[list[int]]], layers: int, device: torch.device) -> torch.Tensor:
    """Pad per-group block tables (lists of [layers] page ids) into one int32 tensor [G, M, layers]."""
    width = max([len(b) for b in block_lists] + [1])
    out = torch.zeros(len(block_lists), width, max(layers, 1), dtype=torch.int32)
    for g, blocks in enumerate(block_lists):
        if blocks:
            out[g, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return out.to(device)
