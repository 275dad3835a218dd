"""Admission, chunking and preemption.

Every tick each running sequence either has a chunk in flight (it keeps moving through the
recursions) or gets its next chunk: the rest of its prompt (chunked to fit the token budget) or
its freshly sampled token. Waiting sequences are admitted first-come first-served while the
token budget (tokens in flight, which is also the hidden-state pool size), max_num_seqs and free
KV pages allow. When pages run out, the most recently admitted sequence is preempted: its pages
and in-flight work are dropped and it is recomputed later from its tokens (never a wrong token).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from morserve.engine.kv_cache import BlockManager
from morserve.engine.sequence import Chunk, Sequence, SeqStatus


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 release_slots: Callable) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.release_slots = release_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def tokens_in_flight(self) -> int:
        return sum(s.chunk.n for s in self.running if s.chunk is not None)

    def schedule(self, reserved_pages: int) -> list[Chunk]:
        """New chunks for this tick, with their stage-0 entries reserved. `reserved_pages` is
        what the chunks already in flight need for this tick's block step."""
        budget = self.max_num_batched_tokens - self.tokens_in_flight()
        free = self.blocks.num_free_pages - reserved_pages
        new: list[Chunk] = []
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.chunk is not None or seq.status != SeqStatus.RUNNING:
                continue
            while True:
                chunk, need = self._next_chunk(seq, budget)
                if need <= free:
                    break
                victim = self.running[-1]
                before = self.blocks.num_free_pages       # (pages shared with others stay held)
                self.preempt(victim)
                free += self.blocks.num_free_pages - before
                if victim is seq:
                    chunk = None
                    break
            if chunk is None:
                continue
            free -= need
            budget -= chunk.n
            new.append(chunk)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            before = self.blocks.num_free_pages
            cached = self._attach_prefix(seq)
            free -= before - self.blocks.num_free_pages
            chunk, need = self._next_chunk(seq, budget)
            if need > free:
                if cached:                  # not admitted: give the prefix back
                    self.blocks.free_sequence(seq.seq_id)
                    seq.num_computed = 0
                break
            if self.blocks.prefix is not None and self._reads_prefix_cache(seq):
                self.blocks.prefix.record(seq.prompt_len, cached)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            if seq.request.first_scheduled_time is None:
                seq.request.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            free -= need
            budget -= chunk.n
            new.append(chunk)
        for chunk in new:
            self.blocks.append(chunk.seq.seq_id, 0, chunk.n)
            chunk.seq.chunk = chunk
        return new

    @staticmethod
    def _reads_prefix_cache(seq: Sequence) -> bool:
        """Requests that want prompt logprobs compute every prompt position (as in vLLM)."""
        return seq.request.params.prompt_logprobs is None

    def _attach_prefix(self, seq: Sequence) -> int:
        """Give a sequence being admitted the longest cached prefix of its prompt; returns its length."""
        prefix = self.blocks.prefix
        if prefix is None or not self._reads_prefix_cache(seq):
            return 0
        req = seq.request
        hit = prefix.match(req.prompt_token_ids, seq.caps.span(0, req.prompt_len), req.cache_scope)
        if hit is None or not self.blocks.attach_prefix(seq.seq_id, hit):
            return 0
        seq.num_computed = hit.length
        seq.prompt_depths = list(hit.depths)
        return hit.length

    def _next_chunk(self, seq: Sequence, budget: int) -> tuple[Chunk, int]:
        start = seq.num_computed
        n = min(len(seq.token_ids) - start, budget)
        chunk = Chunk(seq=seq, start=start, token_ids=seq.token_ids[start:start + n])
        need = (self.blocks.pages_needed(seq.seq_id, 0, n)
                + self.blocks.pages_needed(seq.seq_id, 1, n))
        return chunk, need

    def ensure_pages(self, chunks: list[Chunk], need_of: Callable[[list[Chunk]], dict[int, int]]) -> list[Chunk]:
        """Preempt the newest sequences until the block step of `chunks` fits; returns the
        chunks that remain."""
        while chunks:
            need = sum(need_of(chunks).values())
            if need <= self.blocks.num_free_pages:
                break
            victim = self.running[-1]
            self.preempt(victim)
            chunks = [c for c in chunks if c.seq is not victim]
        return chunks

    def _release(self, seq: Sequence) -> None:
        """Free the sequence's KV pages and the pool rows of its in-flight chunk."""
        self.blocks.free_sequence(seq.seq_id)
        if seq.chunk is not None:
            if seq.chunk.slots is not None:
                self.release_slots(seq.chunk.slots)
            seq.chunk = None

    def preempt(self, seq: Sequence) -> None:
        """Drop everything the sequence holds; it will be recomputed from its tokens."""
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        seq.request.num_preemptions += 1
        self.num_preemptions += 1

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out, freeing its pages and pool rows."""
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
