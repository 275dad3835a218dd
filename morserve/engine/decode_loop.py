"""Multi-step decoding with the batch state on the device (vLLM's num_scheduler_steps).

When every running sequence decodes greedily or by plain temperature sampling (no prompt work in
flight, nothing admissible waiting, no penalties, bans, truncation or top-N logprobs), the engine
hands K ticks to this loop. The state of
each sequence's token in flight (token id, position, recursion depth, pool slot, per-stage KV
lengths, block tables) lives in device tensors with one row per sequence, and one tick is the
engine's tick (the phases of tick.py, the same functions the per-tick runner calls) over the loaded
rows, with masks instead of Python bookkeeping:
1. `TickPhases.prologue` for rows whose sampled token has not entered the model yet (depth 0);
2. `TickPhases.block` over the rows in the block, at mixed depths (depth-synchronous batching:
   Nr passes, so that every row leaves the block within the tick), its metadata from the rows'
   state by CacheStages' rule;
3. `TickPhases.epilogue` and `sampler.plain_tail` for the rows that left the block; their next
   token is recorded in the tick's output row and enters the prologue in the next tick.
The bookkeeping between the phases (which rows take part, stage-0 and block metadata, KV lengths,
per-depth counts, records, the next token in flight and the next tick's prologue rows) is three
fused ops over the state rows, kernels.loop_block_meta / loop_block_exit / loop_emit (one launch
each; loop_emit prepares the next tick as vLLM's advance_step does, loop_prologue_rows the first
tick after a load), so a tick launches the phases' kernels and hardly anything else.
Rows that take no part in a phase point at the pool's scratch row and write no K/V, so every tick
has the same shapes: on CUDA the tick over the loaded rows, padded to a bucket size, is captured
once as a CUDA graph (cuda_graphs.capture_graph) and replayed K times; on the CPU it runs over the
loaded rows alone.
Before the loop the host reserves pages for K more entries per stage; after it, the host reads the
K ticks' tokens at once, applies stop conditions in order and takes the state back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import kernels
from morserve.engine.cuda_graphs import capture_graph, graph_sizes
from morserve.engine.sampler import as_int64, plain_tail
from morserve.engine.sequence import Chunk, Sequence

# rows of the host field mirror: token, position, depth, target, slot, live, seed
SLOT_ROW, LIVE_ROW, SEED_ROW = 4, 5, 6
# the tick's int64 records and the row state the host takes back, each packed in one tensor (one
# read-back copy each, with the float32 log-probabilities a third)
_PACKED = ("records", "out_logprobs", "row_state")


def _record_views(records: torch.Tensor, rows: int, nr: int) -> dict[str, torch.Tensor]:
    """records [steps, 2 * rows + 2 * nr + 1] -> out_tokens, out_depths [steps, rows], out_occupancy,
    out_exits [steps, nr], out_prologue [steps] (views)."""
    tokens, depths, occupancy, exits, prologue = records.split([rows, rows, nr, nr, 1], dim=1)
    return dict(out_tokens=tokens, out_depths=depths, out_occupancy=occupancy, out_exits=exits,
                out_prologue=prologue.squeeze(1))


def _state_views(row_state: torch.Tensor, rows: int, stages: int) -> dict[str, torch.Tensor]:
    """row_state [rows * (3 + stages)] -> depth, position, target [rows], lengths [rows, stages] (views)."""
    depth, position, target, lengths = row_state.split([rows, rows, rows, rows * stages])
    return dict(depth=depth, position=position, target=target, lengths=lengths.view(rows, stages))


@dataclass
class LoopHandle:
    """A launched loop: the pinned buffer its results are copied to, and the event that says so."""

    buffer: dict[str, torch.Tensor]
    steps: int
    done: torch.cuda.Event | None       # None on CPU (copies are synchronous there)


@dataclass
class LoopOutput:
    """Host copies of what `steps` ticks produced; [steps, rows] arrays (token -1 = none)."""

    tokens: np.ndarray
    depths: np.ndarray           # recursions taken by the position that produced the token
    logprobs: np.ndarray
    occupancy: np.ndarray        # [steps, Nr] tokens per depth in the block pass(es)
    exits: np.ndarray            # [steps, Nr]
    prologue_tokens: np.ndarray  # [steps]
    depth: np.ndarray            # final state per row: 0 = next token not yet in the model
    position: np.ndarray
    target: np.ndarray           # token choice: chosen depth of the token in flight
    lengths: np.ndarray          # [rows, stages] KV entries per stage


class DecodeLoop:
    """Device state for up to `max_seqs` decoding sequences and the captured tick."""

    def __init__(self, runner, max_seqs: int, max_model_len: int, max_steps: int, depth_sync: bool,
                 capture: bool) -> None:
        self.runner, self.blocks, self.phases, self.stages = runner, runner.blocks, runner.phases, runner.stages
        self.mor = runner.mor
        self.depth_sync, self.capture, self.max_steps = depth_sync, capture, max_steps
        self.rows_max = max_seqs
        stages = len(self.blocks.layers_per_stage)
        width = -(-max_model_len // self.blocks.block_size)
        layers = max(max(self.blocks.layers_per_stage), 1)
        dev, nr = runner.device, self.mor.num_recursions
        with torch.inference_mode():
            long = dict(dtype=torch.long, device=dev)
            self.token = torch.zeros(max_seqs, **long)
            self.row_state = torch.zeros(max_seqs * (3 + stages), **long)
            self.depth, self.position, self.target, self.lengths = _state_views(self.row_state, max_seqs,
                                                                                stages).values()
            self.slot = torch.full((max_seqs,), runner.pool_size, **long)
            self.seed = torch.zeros(max_seqs, **long)
            self.temperature = torch.zeros(max_seqs, dtype=torch.float32, device=dev)
            self.live = torch.zeros(max_seqs, dtype=torch.bool, device=dev)
            self.tables = torch.zeros(max_seqs, stages, width, layers, dtype=torch.int32, device=dev)
            # the block tables are passed as the view [rows * stages, width, layers]: group row * stages
            # + stage is (row, stage); the stage-0 phases read groups row * stages
            self.stage0_groups = torch.arange(0, max_seqs * stages, stages, **long)
            # the next tick's prologue rows (stage-0 slots, entries, kv_lens): loop_emit writes them
            self.entering = (torch.zeros(max_seqs, **long), torch.zeros(max_seqs, **long),
                             torch.zeros(max_seqs, **long))
            self.step = torch.zeros(1, **long)
            self.records = torch.zeros(max_steps, 2 * max_seqs + 2 * nr + 1, **long)
            (self.out_tokens, self.out_depths, self.out_occupancy, self.out_exits,
             self.out_prologue) = _record_views(self.records, max_seqs, nr).values()
            self.out_logprobs = torch.zeros(max_steps, max_seqs, dtype=torch.float32, device=dev)
        # host mirrors of the loaded state (pinned on CUDA; the next load comes after run()'s
        # read-back, so the asynchronous copies out of them have finished by then)
        pin = dev.type == "cuda"
        self._fields_pinned = torch.zeros(SEED_ROW + 1, max_seqs, dtype=torch.long, pin_memory=pin)
        self._temperatures_pinned = torch.zeros(max_seqs, dtype=torch.float32, pin_memory=pin)
        self._lengths_pinned = torch.zeros(max_seqs, stages, dtype=torch.long, pin_memory=pin)
        self._tables_pinned = torch.zeros(max_seqs, stages, width, layers, dtype=torch.int32, pin_memory=pin)
        self._fields_host = self._fields_pinned.numpy()
        self._lengths_host = self._lengths_pinned.numpy()
        self._tables_host = self._tables_pinned.numpy()
        self._mirrored: list[list] = [[None] * stages for _ in range(max_seqs)]
        self._tables_copied: torch.cuda.Event | None = None   # the mirror may be rewritten once set
        self._readback = []
        for _ in range(2):
            buffer = {name: torch.empty(getattr(self, name).shape, dtype=getattr(self, name).dtype, pin_memory=pin)
                      for name in _PACKED}
            buffer |= _record_views(buffer["records"], max_seqs, nr) | _state_views(buffer["row_state"], max_seqs,
                                                                                      stages)
            self._readback.append(buffer)
        self._next_buffer = 0
        self.sampling = False          # some row draws at random: the tick computes the draw
        self.rows = 0                  # rows the tick runs over: the loaded ones (padded on CUDA)
        self.row_sizes = graph_sizes(max_seqs)
        self.graphs: dict[tuple[bool, int], torch.cuda.CUDAGraph] = {}   # one captured tick per (sampling, rows)

    # ---- host side ----------------------------------------------------------------------------
    def entries_bound(self, ticks: int) -> list[int]:
        """The most K/V entries one row can write per cache stage in `ticks` ticks."""
        return self.stages.entries_bound(ticks, self.depth_sync)

    def load(self, seqs: list[Sequence]) -> None:
        """Copy the sequences' decode state into rows 0..len(seqs)-1. A sequence without a chunk
        in flight gets one for its pending token (holding a pool slot, depth 0). Block tables go
        through a host mirror that is only rewritten where a (row, stage) table changed."""
        n = len(seqs)
        scratch, layers_per_stage = self.runner.pool_size, self.blocks.layers_per_stage
        fields = self._fields_host
        fields[:] = 0
        fields[SLOT_ROW] = scratch
        fields[LIVE_ROW, :n] = 1
        lengths, stage_caches = self._lengths_host, self.blocks.tables
        lengths[:] = 0
        temperatures = self._temperatures_pinned.numpy()
        temperatures[:] = 0.0
        for b, seq in enumerate(seqs):
            chunk = seq.chunk
            if chunk is None:
                pos = len(seq.token_ids) - 1
                chunk = seq.chunk = Chunk(seq=seq, start=pos, token_ids=[seq.token_ids[pos]],
                                          slots=self.runner.alloc_slots(1), depth=0)
            target = chunk.target_depth[0] if chunk.target_depth is not None else 0
            fields[:LIVE_ROW, b] = (chunk.token_ids[0], chunk.start, chunk.depth, target, chunk.slots[0])
            fields[SEED_ROW, b] = as_int64(seq.seed)
            temperatures[b] = seq.request.params.temperature
            for stage in range(len(layers_per_stage)):
                cache = stage_caches.get((seq.seq_id, stage))
                lengths[b, stage] = cache.length if cache is not None else 0
        self.sampling = bool(temperatures[:n].any())
        # every token a row computes in the loop routes with its sequence's current overrides
        self.phases.set_routing(torch.tensor([seq.chunk.slots[0] for seq in seqs], dtype=torch.long).to(self.slot.device),
                                [seq.caps.current for seq in seqs], [seq.request.router_threshold for seq in seqs])
        self.rows = next(size for size in self.row_sizes if size >= n) if self.capture else n
        self.refresh_tables(seqs)
        with torch.inference_mode():
            device_fields = self._fields_pinned.to(self.token.device, non_blocking=True)
            for row, name in enumerate(("token", "position", "depth", "target", "slot")):
                getattr(self, name).copy_(device_fields[row])
            self.live.copy_(device_fields[LIVE_ROW].bool())
            self.seed.copy_(device_fields[SEED_ROW])
            self.temperature.copy_(self._temperatures_pinned, non_blocking=True)
            self.lengths.copy_(self._lengths_pinned, non_blocking=True)
            self._prepare_prologue()

    def _prepare_prologue(self) -> None:
        """The first tick's prologue rows from the state (later ticks get them from loop_emit)."""
        kernels.loop_prologue_rows(self.live, self.depth, self.slot, self.position, self.phases.scratch,
                                   *self.entering)

    def refresh_tables(self, seqs: list[Sequence]) -> None:
        """Bring the device block tables of rows 0..len(seqs)-1 up to date (new pages reserved
        since the last copy). Safe while a loop runs: it only adds pages past what that loop may
        reach, and the copy is ordered after it on the stream."""
        if self._tables_copied is not None:
            self._tables_copied.synchronize()          # the last copy out of the mirror is done
        tables, stage_caches, layers_per_stage = self._tables_host, self.blocks.tables, self.blocks.layers_per_stage
        for b, seq in enumerate(seqs):
            mirrored = self._mirrored[b]
            for stage, layers in enumerate(layers_per_stage):
                cache = stage_caches.get((seq.seq_id, stage))
                if cache is not None and mirrored[stage] != (cache, cache.version):
                    tables[b, stage, : cache.num_blocks, :layers] = cache.table
                    mirrored[stage] = (cache, cache.version)
        with torch.inference_mode():
            self.tables.copy_(self._tables_pinned, non_blocking=True)
        if self.tables.is_cuda:
            self._tables_copied = torch.cuda.Event()
            self._tables_copied.record()

    def launch(self, steps: int) -> LoopHandle:
        """Enqueue `steps` ticks (<= max_steps) and the copy of their results into one of two
        pinned host buffers; returns at once on CUDA (collect() waits)."""
        with torch.inference_mode():
            self.step.zero_()
            key = (self.sampling, self.rows)
            if self.capture and key not in self.graphs:
                self._capture(*key)
            graph = self.graphs.get(key)
            for _ in range(steps):
                if graph is not None:
                    graph.replay()
                else:
                    self._tick(*key)
            buffer = self._readback[self._next_buffer]
            self._next_buffer ^= 1
            buffer["records"][:steps].copy_(self.records[:steps], non_blocking=True)
            buffer["out_logprobs"][:steps].copy_(self.out_logprobs[:steps], non_blocking=True)
            buffer["row_state"].copy_(self.row_state, non_blocking=True)
            done = torch.cuda.Event() if self.token.is_cuda else None
            if done is not None:
                done.record()
        return LoopHandle(buffer, steps, done)

    @staticmethod
    def collect(handle: LoopHandle, num_rows: int) -> LoopOutput:
        """Wait for a launched loop and copy its results out of the pinned buffer."""
        if handle.done is not None:
            handle.done.synchronize()
        per_step = lambda name: handle.buffer[name][: handle.steps].numpy().copy()
        per_row = lambda name: handle.buffer[name][:num_rows].numpy().copy()
        return LoopOutput(tokens=per_step("out_tokens")[:, :num_rows], depths=per_step("out_depths")[:, :num_rows],
                          logprobs=per_step("out_logprobs")[:, :num_rows], occupancy=per_step("out_occupancy"),
                          exits=per_step("out_exits"), prologue_tokens=per_step("out_prologue"),
                          depth=per_row("depth"), position=per_row("position"), target=per_row("target"),
                          lengths=per_row("lengths"))

    def _capture(self, sampling: bool, rows: int) -> None:
        """Capture one tick over `rows` rows. Warm-up and capture run with every row inert (live =
        False), so they touch only the scratch row; the live mask is restored afterwards."""
        live = self.live.clone()
        self.live.zero_()
        self._prepare_prologue()
        self.graphs[(sampling, rows)], _ = capture_graph(lambda: self._tick(sampling, rows))
        self.live.copy_(live)
        self._prepare_prologue()
        self.step.zero_()

    # ---- one tick on the device ---------------------------------------------------------------
    def _tick(self, sampling: bool, rows: int) -> None:
        """One tick over state rows 0..rows-1 (the rows past the loaded ones are inert): the phases,
        with the rows' bookkeeping between them in three fused launches (kernels.loop_*, whose
        docstrings in kernels.reference define the state; a row's depth is -d from the pass it
        leaves the block at depth d to the end of the tick). The prologue's rows were written by
        the last tick's loop_emit (or by load)."""
        phases, kv, nr, scratch = self.phases, self.phases.kv, self.mor.num_recursions, self.phases.scratch
        token, position, depth, target, slot, live, lengths = (
            t[:rows] for t in (self.token, self.position, self.depth, self.target, self.slot, self.live, self.lengths))
        tables, stage0_groups = self.tables[:rows].flatten(0, 1), self.stage0_groups[:rows]

        slots, entries, kv_lens = (t[:rows] for t in self.entering)
        attends = kv.attend_fns(tables, stage0_groups, entries, kv_lens, position, phases.prologue_columns)
        entered = phases.prologue(token, slots, attends)
        for k in range(nr if self.depth_sync else 1):
            meta = kernels.loop_block_meta(live, depth, slot, position, target, lengths,
                                           target if entered is None else entered, self.out_prologue,
                                           self.out_occupancy, self.out_exits, self.step, scratch, nr,
                                           self.stages.share_first, enter=k == 0)
            cont = phases.block(meta, tables)
            slots, entries, kv_lens = kernels.loop_block_exit(live, depth, cont, slot, position, self.out_exits,
                                                              self.step, nr, scratch)
        attends = kv.attend_fns(tables, stage0_groups, entries, kv_lens, position, phases.epilogue_columns)
        logits = phases.epilogue(slots, attends)
        drawn_at = position + 1 if sampling else position          # greedy rows draw nothing: no launch
        new, logprob, valid = plain_tail(logits, self.temperature[:rows], self.seed[:rows], drawn_at, sampling)
        kernels.loop_emit(live, depth, slot, position, token, new, logprob, valid, self.out_tokens[:, :rows],
                          self.out_depths[:, :rows], self.out_logprobs[:, :rows], self.step, scratch,
                          *(t[:rows] for t in self.entering))
