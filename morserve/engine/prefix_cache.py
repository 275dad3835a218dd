"""Automatic prefix caching over the per-stage KV pages of MoR (vLLM's `enable_prefix_caching`).

Why it is exact. Stage 0 holds an entry for every token, stage s >= 1 the entries of the tokens
that took depth >= s (recursion-wise; share-first has stage 1 only, every token). Routing is
causal: expert choice decides a token's next recursion from its own hidden state, token choice
from its state after the prologue, and that state depends only on the tokens up to it (and the
request's routing overrides). So a prompt prefix fixes, whatever follows it, both which of its
tokens took each depth and every K/V entry they wrote (tests/test_prefix_cache.py checks this).

Block keys. A full block of stage s is keyed by a hash chained over the previous block's key,
the stage, the (token, depth cap) pairs of the positions since the previous block's last entry up
to its own last entry, and the request's expert threshold. For stage 0 a block is `block_size`
consecutive positions; for a compact stage s its `block_size` entries end at the prompt position
of its last entry. Stage-0 blocks also keep the depths of their tokens, so a hit restores which
prefix tokens took which depth, and from that the position of every compact entry.

A hit of L tokens (L < prompt length: the last prompt token is always computed, its logits start
the output) shares, per stage, the full cached blocks that lie inside the prefix and copies the
first entries of a block that the prefix ends inside (copy-on-write), so that a sequence never
writes into a shared page. L is the longest prefix all of whose per-stage entries are cached.
Requests that want prompt logprobs skip the lookup (as in vLLM) but their blocks are cached.

Pages of cached blocks are ref-counted (tables holding them); at zero they stay cached, in LRU
order, and count as free: an allocation short of free pages evicts the least recently used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

ROOT = b"\0" * 16


def block_key(parent: bytes, stage: int, tokens: list[int], caps: list[int], threshold: float) -> bytes:
    """Key of a block given its parent's key and the (token, cap) pairs since the parent's end."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.array([stage, len(tokens)], dtype=np.int64).tobytes())
    h.update(np.array([threshold], dtype=np.float64).tobytes())
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    h.update(np.asarray(caps, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(eq=False)
class CachedBlock:
    key: bytes
    stage: int
    pages: tuple[int, ...]            # one page per layer of the stage
    ref: int = 0                      # block tables holding it
    depths: list[int] = field(default_factory=list)   # stage 0: recursions taken by its tokens


@dataclass
class PrefixHit:
    """`length` prompt tokens are cached; per stage, the shared blocks, the block whose first
    `entries % block_size` entries are copied (or None), and the stage's entry count."""

    length: int
    depths: list[int]
    shared: list[list[CachedBlock]]
    partial: list[CachedBlock | None]
    entries: list[int]


class PrefixCache:
    """Key -> cached block, first page -> cached block, and the LRU of unreferenced ones."""

    def __init__(self, block_size: int, num_stages: int) -> None:
        self.block_size = block_size
        self.num_stages = num_stages
        self.blocks: dict[bytes, CachedBlock] = {}
        self.by_page: dict[int, CachedBlock] = {}
        self.lru: OrderedDict[bytes, CachedBlock] = OrderedDict()
        self.queries = 0                  # prompt tokens looked up (vLLM: prefix_cache_queries)
        self.hits = 0                     # of which cached (vLLM: prefix_cache_hits)

    # ---- pages ----------------------------------------------------------------------------------
    @property
    def num_evictable_pages(self) -> int:
        return sum(len(b.pages) for b in self.lru.values())

    def evict(self) -> tuple[int, ...]:
        """Drop the least recently used unreferenced block; returns its pages."""
        key, block = self.lru.popitem(last=False)
        del self.blocks[key]
        del self.by_page[block.pages[0]]
        return block.pages

    def acquire(self, block: CachedBlock) -> bool:
        """One more table holds the block; True if it was unreferenced (it leaves the LRU)."""
        block.ref += 1
        if block.ref == 1:
            del self.lru[block.key]
            return True
        return False

    def release(self, first_page: int) -> bool | None:
        """A table drops the block starting at `first_page`: None if it is not cached (the caller
        frees its pages), else whether it became unreferenced (it joins the LRU, most recent)."""
        block = self.by_page.get(first_page)
        if block is None:
            return None
        block.ref -= 1
        if block.ref == 0:
            self.lru[block.key] = block
            return True
        return False

    # ---- keys -------------------------------------------------------------------------------------
    @staticmethod
    def _positions(depths: list[int], stage: int) -> list[int] | range:
        """Positions with an entry at `stage`: every token at stages 0 and 1, else depth >= stage."""
        return range(len(depths)) if stage <= 1 else [p for p, d in enumerate(depths) if d >= stage]

    def _stage_blocks(self, tokens: list[int], caps: list[int], depths: list[int], threshold: float):
        """(stage, block index, key, last position) of every full block the positions with known
        `depths` fill, stage by stage, in chain order."""
        bs = self.block_size
        for stage in range(self.num_stages):
            positions = self._positions(depths, stage)
            key, prev = ROOT, -1
            for j in range(len(positions) // bs):
                last = positions[(j + 1) * bs - 1]
                key = block_key(key, stage, tokens[prev + 1: last + 1], caps[prev + 1: last + 1], threshold)
                yield stage, j, key, last
                prev = last

    def register(self, tokens: list[int], caps: list[int], depths: list[int], threshold: float,
                 tables: list[np.ndarray]) -> None:
        """Cache the full blocks of a sequence's computed prompt positions (`depths` known for
        each; `tables[s]` its stage-s block table). Blocks whose key is cached already are left as
        they are (the sequence keeps its own copy)."""
        bs = self.block_size
        for stage, j, key, _ in self._stage_blocks(tokens, caps, depths, threshold):
            if key in self.blocks:
                continue
            pages = tuple(int(p) for p in tables[stage][j])
            if pages[0] in self.by_page:          # the same pages under another key: never
                raise RuntimeError(f"page {pages[0]} is cached twice")
            block = CachedBlock(key, stage, pages, ref=1,
                                depths=list(depths[j * bs:(j + 1) * bs]) if stage == 0 else [])
            self.blocks[key] = block
            self.by_page[pages[0]] = block

    def match(self, tokens: list[int], caps: list[int], threshold: float) -> PrefixHit | None:
        """The longest cached prefix of a prompt (at most len(tokens) - 1 tokens), or None."""
        bs, n = self.block_size, len(tokens)
        key, stage0, depths = ROOT, [], []
        for i in range(n // bs):
            key = block_key(key, 0, tokens[i * bs:(i + 1) * bs], caps[i * bs:(i + 1) * bs], threshold)
            block = self.blocks.get(key)
            if block is None:
                break
            stage0.append(block)
            depths += block.depths
        length = min(len(depths), n - 1)
        if length <= 0:
            return None
        hits: list[list[CachedBlock]] = [stage0] + [[] for _ in range(1, self.num_stages)]
        missed: set[int] = set()
        for stage, j, key, _ in self._stage_blocks(tokens, caps, depths, threshold):
            block = self.blocks.get(key) if stage and stage not in missed else None
            if block is not None:
                hits[stage].append(block)
            elif stage:
                missed.add(stage)
        for stage in range(1, self.num_stages):     # the prefix ends before the first uncached entry
            positions = self._positions(depths, stage)
            if len(hits[stage]) * bs < len(positions):
                length = min(length, positions[len(hits[stage]) * bs])
        if length <= 0:
            return None
        entries = [length] + [sum(d >= s for d in depths[:length]) for s in range(1, self.num_stages)]
        shared, partial = [], []
        for stage, count in enumerate(entries):
            full, rest = divmod(count, bs)
            shared.append(hits[stage][:full])
            partial.append(hits[stage][full] if rest else None)
        return PrefixHit(length, depths[:length], shared, partial, entries)

    def record(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
