"""Multi-step orchestration: when to hand K ticks to the device decode loop (decode_loop.py),
chaining loops (the next one is launched before the last one's tokens are handled, so the host
works while the device computes), and taking the tokens, KV lengths and the in-flight state back
into the per-tick engine's structures."""

from __future__ import annotations

from dataclasses import dataclass

from morserve.engine.decode_loop import DecodeLoop, LoopHandle, LoopOutput
from morserve.engine.kv_cache import BlockManager
from morserve.engine.output_processor import OutputProcessor
from morserve.engine.runner import ModelRunner
from morserve.engine.sampler import is_plain
from morserve.engine.scheduler import Scheduler
from morserve.engine.sequence import Chunk, Request, Sequence
from morserve.engine.stats import TickRecorder, TickStats


@dataclass
class LoopFlight:
    """A decode loop launched on the device and not yet collected, over these sequences."""

    seqs: list[Sequence]
    steps: int
    handle: LoopHandle


class MultiStep:
    """Runs up to `max_steps` ticks per engine step on `loop` while the running batch allows it."""

    def __init__(self, loop: DecodeLoop, max_steps: int, max_num_seqs: int, max_model_len: int,
                 scheduler: Scheduler, blocks: BlockManager, runner: ModelRunner, processor: OutputProcessor,
                 recorder: TickRecorder) -> None:
        self.loop, self.max_steps, self.max_num_seqs, self.max_model_len = loop, max_steps, max_num_seqs, max_model_len
        self.scheduler, self.blocks, self.runner = scheduler, blocks, runner
        self.processor, self.recorder = processor, recorder
        self.flight: LoopFlight | None = None

    def steps(self) -> int:
        """Ticks the decode loop may run now: 0 unless every running sequence decodes greedily or by
        plain temperature sampling (single-token chunks, sampler.is_plain) and no waiting request
        could be admitted; at most what the context leaves every sequence. A sequence that reaches
        max_tokens or a stop inside the loop keeps its row busy to the end of the loop, and the
        tokens past its end are dropped."""
        seqs, steps = self.scheduler.running, self.max_steps
        if not seqs or (self.scheduler.waiting and len(seqs) < self.max_num_seqs):
            return 0
        for seq in seqs:
            p = seq.request.params
            if not is_plain(p, []) or len(seq.output_ids) < p.min_tokens:
                return 0
            chunk = seq.chunk
            pending = seq.num_computed == len(seq.token_ids) - 1 if chunk is None else chunk.n == chunk.num_active == 1
            if not pending or (chunk is not None and seq.caps.at(chunk.start) != seq.caps.current):
                return 0      # (the loop routes a row's tokens with one depth cap)
            steps = min(steps, self.max_model_len - len(seq.token_ids))
        if sum(seq.chunk is None for seq in seqs) > self.runner.num_free_slots:
            return 0          # every row holds a pool slot for the whole loop
        return steps

    def try_start(self) -> bool:
        """Launch a loop over the running sequences if one applies and its pages fit."""
        steps = self.steps()
        if steps <= 1 or not self.blocks.reserve_ahead([s.seq_id for s in self.scheduler.running],
                                                       self.loop.entries_bound(steps)):
            return False
        seqs = list(self.scheduler.running)
        self.loop.load(seqs)
        self.flight = LoopFlight(seqs, steps, self.loop.launch(steps))
        return True

    def advance(self) -> set[Request]:
        """Collect the loop in flight. When nothing stands in the way (no sequence ended or was
        aborted, nothing admissible waiting, pages and context for two more loops), the next loop
        is launched first, so the device computes it while the host handles this one's tokens;
        otherwise the state comes back to the per-tick engine. Returns the requests touched."""
        flight, loop = self.flight, self.loop
        chained = None
        if self._can_chain(flight):
            loop.refresh_tables(flight.seqs)
            chained = loop.launch(flight.steps)
        out = loop.collect(flight.handle, len(flight.seqs))
        touched = self._take_tokens(flight.seqs, out, trim=chained is None)
        if chained is not None and any(seq.finished for seq in flight.seqs):
            out = loop.collect(chained, len(flight.seqs))            # drain: its rows finish idle
            touched |= self._take_tokens(flight.seqs, out, trim=True)
            chained = None
        if chained is not None:
            self.flight = LoopFlight(flight.seqs, flight.steps, chained)
        else:
            for b, seq in enumerate(flight.seqs):
                if not seq.finished:
                    self._take_back(seq, out, b)
            self.flight = None
        return touched

    def drop_if_idle(self) -> None:
        """After aborts: a loop whose sequences all finished has nothing left to give."""
        flight = self.flight
        if flight is not None and all(seq.finished for seq in flight.seqs):
            self.loop.collect(flight.handle, len(flight.seqs))
            self.flight = None

    def _can_chain(self, flight: LoopFlight) -> bool:
        """Pages are reserved relative to the lengths the host knows, which lag the device by the
        loop in flight: the next loop needs room for two loops' entries."""
        seqs, steps = flight.seqs, flight.steps
        if any(seq.finished for seq in seqs) or (self.scheduler.waiting and len(seqs) < self.max_num_seqs):
            return False
        if any(self.max_model_len - len(seq.token_ids) < 2 * steps for seq in seqs):
            return False
        return self.blocks.reserve_ahead([seq.seq_id for seq in seqs], self.loop.entries_bound(2 * steps))

    def _take_tokens(self, seqs: list[Sequence], out: LoopOutput, trim: bool) -> set[Request]:
        """A finished loop's tokens, sequence by sequence, and its KV lengths; publishes one
        TickStats per tick. Sequences that ended (or were aborted) before are skipped."""
        generated = [0] * len(out.tokens)
        touched: set[Request] = set()
        rows = zip(seqs, out.lengths.tolist(), out.tokens.T.tolist(), out.depths.T.tolist(), out.logprobs.T.tolist())
        for seq, lengths, tokens, depths, logprobs in rows:
            if seq.finished:
                continue
            self.blocks.commit_lengths(seq.seq_id, lengths, trim)
            ticks = [k for k, token in enumerate(tokens) if token != -1]
            kept = self.processor.append_burst(seq, [tokens[k] for k in ticks], [depths[k] for k in ticks],
                                               [logprobs[k] for k in ticks])
            for k in ticks[:kept]:
                generated[k] += 1
            if kept:
                touched.add(seq.request)
        for k, count in enumerate(generated):
            self.recorder.record(self._tick_stats(out, k, count))
        return touched

    def _tick_stats(self, out: LoopOutput, k: int, generated: int) -> TickStats:
        stats = self.recorder.empty()
        stats.depth_occupancy, stats.exits_per_depth = out.occupancy[k].tolist(), out.exits[k].tolist()
        stats.num_block_tokens = sum(stats.depth_occupancy)
        stats.num_prologue_tokens = int(out.prologue_tokens[k])
        stats.num_epilogue_tokens = sum(stats.exits_per_depth)
        stats.num_generated_tokens = generated
        stats.num_block_steps = self.recorder.num_recursions if self.loop.depth_sync else 1
        return stats

    def _take_back(self, seq: Sequence, out: LoopOutput, row: int) -> None:
        """The loop's final state of a sequence as the engine's own: its token in flight (or none)."""
        pos, depth = int(out.position[row]), int(out.depth[row])
        seq.embedded = max(seq.embedded, pos + (depth != 0))
        slots = seq.chunk.slots
        seq.num_computed = pos
        if depth == 0:                       # next token sampled, not in the model yet
            self.runner.release_slots(slots)
            seq.chunk = None
            return
        target = [int(out.target[row])] if self.runner.phases.routing.chooses_depth else None
        seq.chunk = Chunk(seq=seq, start=pos, token_ids=[seq.token_ids[pos]], slots=slots, depth=depth,
                          active=[True], num_active=1, taken=[depth - 1], target_depth=target)
