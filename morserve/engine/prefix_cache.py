"""Automatic prefix caching over the per-stage KV pages of MoR (vLLM's `enable_prefix_caching`).

Why it is exact. Stage 0 holds an entry for every token, stage s >= 1 the entries of the tokens
that took depth >= s (recursion-wise; share-first has stage 1 only, every token). Routing is
causal: expert choice decides a token's next recursion from its own hidden state, token choice
from its state after the prologue, and that state depends only on the tokens up to it (and the
request's routing overrides). So a prompt prefix fixes, whatever follows it, both which of its
tokens took each depth and every K/V entry they wrote (tests/test_prefix_cache.py checks this).

Block keys. A full block of stage s is keyed by a hash chained over the previous block's key,
the stage, the (token, depth cap) pairs of the positions since the previous block's last entry up
to its own last entry, and the request's cache scope (its expert threshold and `cache_salt`,
vLLM's field: requests with different salts never share a block). For stage 0 a block is `block_size`
consecutive positions; for a compact stage s its `block_size` entries end at the prompt position
of its last entry. Stage-0 blocks also keep the depths of their tokens, so a hit restores which
prefix tokens took which depth, and from that the position of every compact entry.

Tails. The deep stages are sparse: at a stage-0 block boundary b a compact stage usually ends
inside a block (its last entries before b do not fill one), and that block fills up with entries
of whatever follows b, so its full key never matches another continuation. So at every stage-0
boundary the block holding a compact stage's last entries before b is also cached under a tail
key (the stage-0 key at b, the stage) with the number of those entries; a hit copies them.

A hit of L tokens (L < prompt length: the last prompt token is always computed, its logits start
the output) shares, per stage, the full cached blocks that lie inside the prefix and copies the
first entries of the block the prefix ends inside (copy-on-write: a sequence never writes into a
shared page). L is the largest stage-0 boundary (or the prompt length - 1) at which every stage's
entries are cached. Requests that want prompt logprobs skip the lookup (as in vLLM) but their
blocks are cached.

Pages of cached blocks are ref-counted (tables holding them); at zero they stay cached, in LRU
order, and count as free: an allocation short of free pages evicts the least recently used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

ROOT = b"\0" * 16
TAIL = b"tail"          # the scope of a tail key (a regular block's is a 16-byte cache_scope)


def cache_scope(threshold: float, salt: str | None) -> bytes:
    """What besides tokens and depth caps decides a request's entries or who may share them: the
    expert threshold it routes with and its cache_salt."""
    h = hashlib.blake2b(np.array([threshold], dtype=np.float64).tobytes(), digest_size=16)
    if salt is not None:
        h.update(b"salt:" + salt.encode("utf-8", "surrogatepass"))
    return h.digest()


def block_key(parent: bytes, stage: int, tokens: list[int], caps: list[int], scope: bytes) -> bytes:
    """Key of a block given its parent's key and the (token, cap) pairs since the parent's end."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.array([stage, len(tokens)], dtype=np.int64).tobytes())
    h.update(scope)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    h.update(np.asarray(caps, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(eq=False)
class CachedBlock:
    pages: tuple[int, ...]            # one page per layer of the stage
    ref: int = 0                      # block tables holding it
    keys: list[bytes] = field(default_factory=list)    # full and tail keys it is cached under
    depths: list[int] = field(default_factory=list)    # stage 0: recursions taken by its tokens


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
    """Full key -> block, tail key -> (block, entries), first page -> block, and the LRU of the
    unreferenced blocks (by first page)."""

    def __init__(self, block_size: int, num_stages: int) -> None:
        self.block_size = block_size
        self.num_stages = num_stages
        self.blocks: dict[bytes, CachedBlock] = {}
        self.tails: dict[bytes, tuple[CachedBlock, int]] = {}
        self.by_page: dict[int, CachedBlock] = {}
        self.lru: OrderedDict[int, CachedBlock] = OrderedDict()
        self.queries = 0                  # prompt tokens looked up (vLLM: prefix_cache_queries)
        self.hits = 0                     # of which cached (vLLM: prefix_cache_hits)

    # ---- pages ----------------------------------------------------------------------------------
    @property
    def num_evictable_pages(self) -> int:
        return sum(len(b.pages) for b in self.lru.values())

    def evict(self) -> tuple[int, ...]:
        """Drop the least recently used unreferenced block (every key of it); returns its pages."""
        first, block = self.lru.popitem(last=False)
        for key in block.keys:
            self.blocks.pop(key, None)
            self.tails.pop(key, None)
        del self.by_page[first]
        return block.pages

    def acquire(self, block: CachedBlock) -> bool:
        """One more table holds the block; True if it was unreferenced (it leaves the LRU)."""
        block.ref += 1
        if block.ref == 1:
            del self.lru[block.pages[0]]
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
            self.lru[first_page] = block
            return True
        return False

    # ---- keys -------------------------------------------------------------------------------------
    @staticmethod
    def _positions(depths: list[int], stage: int) -> list[int] | range:
        """Positions with an entry at `stage`: every token at stages 0 and 1, else depth >= stage."""
        return range(len(depths)) if stage <= 1 else [p for p, d in enumerate(depths) if d >= stage]

    def _stage_blocks(self, tokens: list[int], caps: list[int], depths: list[int], scope: bytes):
        """(stage, block index, key) of every full block the positions with known `depths` fill,
        stage by stage, in chain order."""
        bs = self.block_size
        for stage in range(self.num_stages):
            positions = self._positions(depths, stage)
            key, prev = ROOT, -1
            for j in range(len(positions) // bs):
                last = positions[(j + 1) * bs - 1]
                key = block_key(key, stage, tokens[prev + 1: last + 1], caps[prev + 1: last + 1], scope)
                yield stage, j, key
                prev = last

    def _tails(self, stage0_keys: list[bytes], depths: list[int]):
        """(boundary index i, stage, tail key, block index, entries) for each stage-0 boundary
        b = (i + 1) * block_size <= len(depths) and compact stage that ends inside a block there."""
        bs = self.block_size
        counts = [0] * self.num_stages
        for i, key in enumerate(stage0_keys):
            for d in depths[i * bs:(i + 1) * bs]:
                for stage in range(2, min(d, self.num_stages - 1) + 1):
                    counts[stage] += 1
            for stage in range(2, self.num_stages):
                full, rest = divmod(counts[stage], bs)
                if rest:
                    yield i, stage, block_key(key, stage, [], [], TAIL), full, rest

    def _stage0_keys(self, tokens: list[int], caps: list[int], scope: bytes, blocks: int) -> list[bytes]:
        keys, key, bs = [], ROOT, self.block_size
        for i in range(blocks):
            key = block_key(key, 0, tokens[i * bs:(i + 1) * bs], caps[i * bs:(i + 1) * bs], scope)
            keys.append(key)
        return keys

    def _cache_row(self, key: bytes, row: np.ndarray) -> CachedBlock:
        """The cached block of a sequence's table row (made, held by that table, if it is new)."""
        block = self.by_page.get(int(row[0]))
        if block is None:
            block = CachedBlock(tuple(int(p) for p in row), ref=1)
            self.by_page[block.pages[0]] = block
        elif block.pages != tuple(int(p) for p in row):
            raise RuntimeError(f"table row {row.tolist()} overlaps cached block {block.pages}")
        block.keys.append(key)
        return block

    def register(self, tokens: list[int], caps: list[int], depths: list[int], scope: bytes,
                 tables: list[np.ndarray]) -> None:
        """Cache the full blocks and the tails of a sequence's computed prompt positions (`depths`
        known for each; `tables[s]` its stage-s block table). A key cached already keeps its block
        (the sequence keeps its own copy)."""
        bs = self.block_size
        for stage, j, key in self._stage_blocks(tokens, caps, depths, scope):
            if key not in self.blocks:
                block = self.blocks[key] = self._cache_row(key, tables[stage][j])
                if stage == 0:
                    block.depths = list(depths[j * bs:(j + 1) * bs])
        stage0_keys = self._stage0_keys(tokens, caps, scope, len(depths) // bs)
        for _, stage, key, j, rest in self._tails(stage0_keys, depths):
            if key not in self.tails:
                self.tails[key] = (self._cache_row(key, tables[stage][j]), rest)

    def match(self, tokens: list[int], caps: list[int], scope: bytes) -> PrefixHit | None:
        """The longest cached prefix of a prompt (at most len(tokens) - 1 tokens), or None."""
        bs, n = self.block_size, len(tokens)
        stage0, depths, keys0 = [], [], []
        for key in self._stage0_keys(tokens, caps, scope, n // bs):
            block = self.blocks.get(key)
            if block is None:
                break
            stage0.append(block)
            keys0.append(key)
            depths += block.depths
        if min(len(depths), n - 1) <= 0:
            return None
        hits: list[list[CachedBlock]] = [stage0] + [[] for _ in range(1, self.num_stages)]
        missed: set[int] = set()
        for stage, j, key in self._stage_blocks(tokens, caps, depths, scope):
            block = self.blocks.get(key) if stage and stage not in missed else None
            if block is not None:
                hits[stage].append(block)
            elif stage:
                missed.add(stage)
        tails: dict[tuple[int, int], CachedBlock] = {}
        for i, stage, key, j, rest in self._tails(keys0, depths):
            if key in self.tails and len(hits[stage]) >= j:
                tails[(i, stage)] = self.tails[key][0]
        for i in range(len(keys0) - 1, -1, -1):       # the largest boundary every stage covers
            boundary = (i + 1) * bs
            if all(self._covered(hits[s], tails.get((i, s)), self._count(depths, s, boundary))
                   for s in range(1, self.num_stages)):
                break
        else:
            return None
        length = min(boundary, n - 1)
        entries = [self._count(depths, s, length) for s in range(self.num_stages)]
        shared, partial = [], []
        for stage, count in enumerate(entries):
            full, rest = divmod(count, bs)
            shared.append(hits[stage][:full])
            partial.append(None if not rest else hits[stage][full] if full < len(hits[stage]) else tails[(i, stage)])
        return PrefixHit(length, depths[:length], shared, partial, entries)

    def _count(self, depths: list[int], stage: int, end: int) -> int:
        """Entries of positions < end at `stage`."""
        return end if stage <= 1 else sum(d >= stage for d in depths[:end])

    def _covered(self, hits: list[CachedBlock], tail: CachedBlock | None, count: int) -> bool:
        full, rest = divmod(count, self.block_size)
        return len(hits) > full or (len(hits) == full and (not rest or tail is not None))

    def record(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
