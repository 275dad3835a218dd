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

With prefix caching (prefix_cache.py) full prompt blocks are shared between sequences: pages are
taken through `_take_pages` (which may evict unreferenced cached blocks) and given back through
`_release_rows` (which keeps cached ones in the LRU); `audit()` checks the page accounting.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

import kernels
from morserve.engine.prefix_cache import PrefixCache, PrefixHit


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

    def __init__(self, num_pages: int, block_size: int, layers_per_stage: list[int],
                 prefix_caching: bool = False) -> None:
        if num_pages < 1 or block_size < 1:
            raise ValueError(f"need num_pages >= 1 and block_size >= 1, got {num_pages}, {block_size}")
        self.num_pages = num_pages
        self.block_size = block_size
        self.layers_per_stage = list(layers_per_stage)
        self.free_pages: list[int] = list(range(num_pages - 1, -1, -1))
        self.tables: dict[tuple[int, int], StageCache] = {}
        self.used_blocks = [0] * len(self.layers_per_stage)      # blocks held, per stage
        self.prefix = PrefixCache(block_size, len(self.layers_per_stage)) if prefix_caching else None
        self.copy_pages: Callable[[list[int], list[int]], None] | None = None   # device copy, set by the runner

    # ---- accounting ----------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Free pages, counting those of unreferenced cached blocks (evicted when needed)."""
        if self.prefix is None:
            return len(self.free_pages)
        return len(self.free_pages) + self.prefix.num_evictable_pages

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

    def _take_pages(self, n: int) -> list[int]:
        while len(self.free_pages) < n and self.prefix is not None and self.prefix.lru:
            self.free_pages.extend(self.prefix.evict())
        return [self.free_pages.pop() for _ in range(n)]

    def _add_block(self, cache: StageCache, stage: int) -> None:
        cache.add_block(self._take_pages(self.layers_per_stage[stage]))
        self.used_blocks[stage] += 1

    def _release_rows(self, stage: int, rows: np.ndarray) -> None:
        """A table gives up these blocks ([k, layers] page ids): private ones are freed, cached
        ones lose a reference. Last blocks first, so that a prefix's tail is evicted first."""
        if self.prefix is None:
            self.free_pages.extend(rows.ravel().tolist())
            self.used_blocks[stage] -= len(rows)
            return
        for row in rows[::-1].tolist():
            released = self.prefix.release(row[0])
            if released is None:
                self.free_pages.extend(row)
            if released is not False:
                self.used_blocks[stage] -= 1

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
                self._release_rows(stage, cache.pages[keep: cache.num_blocks])
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
                self._release_rows(stage, cache.table)

    def all_free(self) -> bool:
        return self.num_free_pages == self.num_pages and not self.tables

    # ---- prefix caching --------------------------------------------------------------------
    def attach_prefix(self, seq_id: int, hit: PrefixHit) -> bool:
        """Give a sequence without pages the cached prefix `hit`: shared blocks referenced, the
        block the prefix ends inside (per stage) copied into a fresh one, lengths set. False (and
        nothing done) when the copies do not fit beside the cached blocks the hit revives."""
        prefix = self.prefix
        blocks = [b for stage in hit.shared for b in stage] + [b for b in hit.partial if b is not None]
        revived = sum(len(b.pages) for b in blocks if b.ref == 0)
        copies = sum(self.layers_per_stage[s] for s, b in enumerate(hit.partial) if b is not None)
        if copies > self.num_free_pages - revived:
            return False
        for stage, blocks in enumerate(hit.shared):
            cache = self._cache(seq_id, stage)
            for block in blocks:
                self.used_blocks[stage] += prefix.acquire(block)
                cache.add_block(list(block.pages))
            cache.length = hit.entries[stage]
        sources = [block for block in hit.partial if block is not None]
        for block in sources:                  # held while the copies take pages (no eviction)
            prefix.acquire(block)
        for stage, block in enumerate(hit.partial):
            if block is not None:
                cache = self.tables[(seq_id, stage)]
                self._add_block(cache, stage)
                self.copy_pages(list(block.pages), cache.pages[cache.num_blocks - 1].tolist())
        for block in sources:
            prefix.release(block.pages[0])
        return True

    def cache_prompt(self, seq_id: int, tokens: list[int], caps: list[int], depths: list[int],
                     scope: bytes) -> None:
        """Cache the full blocks of a sequence's first len(depths) prompt positions (computed)."""
        tables = [self.block_table(seq_id, stage) for stage in range(len(self.layers_per_stage))]
        self.prefix.register(tokens, caps, depths, scope, tables)

    def audit(self) -> None:
        """Raise AssertionError unless every page is exactly one of: free, held by block tables
        (a private block by one table, a cached block by as many as its ref count), or cached and
        unreferenced in the LRU; and the per-stage block counts match."""
        holders: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for (seq_id, stage), cache in self.tables.items():
            assert cache.length <= cache.num_blocks * self.block_size or not self.layers_per_stage[stage], \
                f"({seq_id}, {stage}): {cache.length} entries in {cache.num_blocks} blocks"
            for row in cache.table.tolist():
                holders.setdefault(tuple(row), []).append((seq_id, stage))
        cached = self.prefix.by_page if self.prefix is not None else {}
        owner: dict[int, str] = {}

        def claim(page: int, what: str) -> None:
            assert page not in owner, f"page {page} is both {owner[page]} and {what}"
            owner[page] = what

        used = [0] * len(self.layers_per_stage)
        for pages, who in holders.items():
            block = cached.get(pages[0])
            if block is None:
                assert len(who) == 1, f"private pages {pages} are held by {who}"
            else:
                assert block.pages == pages, f"table row {pages} overlaps cached block {block.pages}"
                assert block.ref == len(who), f"cached block {pages}: ref {block.ref}, held by {who}"
            used[who[0][1]] += 1
            for page in pages:
                claim(page, f"held by {who}")
        for block in cached.values():
            if block.ref == 0:
                assert block.pages[0] in self.prefix.lru, f"unreferenced cached block {block.pages} not in the LRU"
                for page in block.pages:
                    claim(page, "cached (unreferenced)")
            else:
                assert block.pages in holders, f"cached block {block.pages} has ref {block.ref} but no holder"
                assert block.pages[0] not in self.prefix.lru, f"referenced block {block.pages} is in the LRU"
        if self.prefix is not None:
            assert len(self.prefix.lru) == sum(b.ref == 0 for b in cached.values()), "LRU holds stale blocks"
            keyed = list(self.prefix.blocks.items()) + [(k, b) for k, (b, _) in self.prefix.tails.items()]
            assert all(cached.get(b.pages[0]) is b and key in b.keys for key, b in keyed), "a key's block is not cached"
            assert sum(len(b.keys) for b in cached.values()) == len(keyed), "a cached block has a stale key"
        for page in self.free_pages:
            claim(page, "free")
        assert sorted(owner) == list(range(self.num_pages)), \
            f"{self.num_pages - len(owner)} pages leaked (neither free, held nor cached)"
        assert used == self.used_blocks, f"blocks per stage {self.used_blocks}, tables hold {used}"


class PagedKVCache:
    """The device side: K and V page pools [num_pages, block_size, Hkv, D] shared by all layers, and
    the start-up RoPE tables `rope` = (cos, sin) [max_positions, D] the K/V store looks rows up in."""

    def __init__(self, num_pages: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        shape = (num_pages, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.scale = head_dim ** -0.5
        self.cos, self.sin = rope

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of pages `src` into pages `dst` (a prefix-cache copy-on-write)."""
        src_t, dst_t = torch.tensor(src, device=self.k.device), torch.tensor(dst, device=self.k.device)
        self.k.index_copy_(0, dst_t, self.k.index_select(0, src_t))
        self.v.index_copy_(0, dst_t, self.v.index_select(0, src_t))

    def attend_fns(self, tables: torch.Tensor, rows: torch.Tensor, entries: torch.Tensor, kv_lens: torch.Tensor,
                   positions: torch.Tensor, columns: range) -> list[Callable]:
        """Attention callbacks for the layers stored in table columns `columns` of tables
        [G, M, layers] (they apply RoPE, see layers.AttendFn): RoPE at `positions` fused with the
        store of the batch's K/V at entry `entries[t]` (-1: none) of table row rows[t], then paged
        attention over each row's first kv_lens entries. Each layer reads a strided view of its
        table column: nothing is built per phase. Pure tensor work: safe inside CUDA-graph capture."""
        return [self._attend(tables[:, :, column], rows, entries, kv_lens, positions) for column in columns]

    def _attend(self, layer_tables: torch.Tensor, rows: torch.Tensor, entries: torch.Tensor,
                kv_lens: torch.Tensor, positions: torch.Tensor) -> Callable:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q = kernels.store_kv_rope(q, k, v, self.cos, self.sin, positions, self.k, self.v, layer_tables, rows,
                                      entries)
            return kernels.paged_attention(q, self.k, self.v, layer_tables, rows, kv_lens, self.scale)
        attend.fuses_rope = True
        return attend


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
