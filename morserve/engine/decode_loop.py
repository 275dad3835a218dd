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

from morserve.engine.cuda_graphs import capture_graph, graph_sizes
from morserve.engine.sampler import as_int64, plain_tail
from morserve.engine.sequence import Chunk, Sequence
from morserve.engine.tick import DEPTH, ENTRY, GROUP, KV_LEN, NUM_FIELDS, POSITION, SLOT, TARGET

# rows of the host field mirror: token, position, depth, target, slot, live, seed
SLOT_ROW, LIVE_ROW, SEED_ROW = 4, 5, 6
_STEP_OUTPUTS = ("out_tokens", "out_depths", "out_logprobs", "out_occupancy", "out_exits", "out_prologue")
_ROW_STATE = ("depth", "position", "target", "lengths")


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
            self.token, self.position = torch.zeros(max_seqs, **long), torch.zeros(max_seqs, **long)
            self.depth, self.target = torch.zeros(max_seqs, **long), torch.zeros(max_seqs, **long)
            self.slot = torch.full((max_seqs,), runner.pool_size, **long)
            self.seed = torch.zeros(max_seqs, **long)
            self.temperature = torch.zeros(max_seqs, dtype=torch.float32, device=dev)
            self.live = torch.zeros(max_seqs, dtype=torch.bool, device=dev)
            self.lengths = torch.zeros(max_seqs, stages, **long)
            self.tables = torch.zeros(max_seqs, stages, width, layers, dtype=torch.int32, device=dev)
            self.row_ids = torch.arange(max_seqs, **long)
            self.depths = torch.arange(1, nr + 1, **long)
            self.step = torch.zeros(1, **long)
            self.out_tokens = torch.zeros(max_steps, max_seqs, **long)
            self.out_depths = torch.zeros(max_steps, max_seqs, **long)
            self.out_logprobs = torch.zeros(max_steps, max_seqs, dtype=torch.float32, device=dev)
            self.out_occupancy = torch.zeros(max_steps, nr, **long)
            self.out_exits = torch.zeros(max_steps, nr, **long)
            self.out_prologue = torch.zeros(max_steps, **long)
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
        self._readback = [{name: torch.empty(getattr(self, name).shape, dtype=getattr(self, name).dtype,
                                             pin_memory=pin) for name in _STEP_OUTPUTS + _ROW_STATE}
                          for _ in range(2)]
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
            for name in _STEP_OUTPUTS:
                buffer[name][:steps].copy_(getattr(self, name)[:steps], non_blocking=True)
            for name in _ROW_STATE:
                buffer[name].copy_(getattr(self, name), non_blocking=True)
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
        self.graphs[(sampling, rows)], _ = capture_graph(lambda: self._tick(sampling, rows))
        self.live.copy_(live)
        self.step.zero_()

    # ---- one tick on the device ---------------------------------------------------------------
    def _record(self, out: torch.Tensor, values: torch.Tensor) -> None:
        out.index_copy_(0, self.step, values.unsqueeze(0).to(out.dtype))

    def _tick(self, sampling: bool, rows: int) -> None:
        """One tick over state rows 0..rows-1 (the rows past the loaded ones are inert)."""
        phases, nr, scratch = self.phases, self.mor.num_recursions, self.phases.scratch
        token, position, depth_state, target_state = (t[:rows] for t in (self.token, self.position, self.depth,
                                                                         self.target))
        slot, live, lengths, tables, row_ids = (t[:rows] for t in (self.slot, self.live, self.lengths, self.tables,
                                                                   self.row_ids))
        record = lambda out, values: out[:, :rows].index_copy_(0, self.step, values.unsqueeze(0).to(out.dtype))
        stage0 = tables[:, 0]

        fresh = live & (depth_state == 0)
        attends = phases.stage0_attention(stage0, row_ids, position, phases.prologue_columns, fresh)
        target = phases.prologue(token, torch.where(fresh, slot, scratch), attends)
        if target is not None:
            target_state.copy_(torch.where(fresh, target, target_state))
        lengths[:, 0].copy_(torch.where(fresh, position + 1, lengths[:, 0]))
        self._record(self.out_prologue, fresh.sum())

        depth = torch.where(fresh, 1, depth_state)
        exit_depth = torch.zeros_like(depth)
        counts = torch.zeros(2, nr, dtype=torch.long, device=depth.device)
        for _ in range(nr if self.depth_sync else 1):
            active = live & (depth >= 1)
            d = depth.clamp(1, nr)
            stage, entry, kv_len, writes = self.stages.device_fields(d, active, position, lengths)
            fields = [None] * NUM_FIELDS
            fields[SLOT], fields[POSITION], fields[GROUP] = torch.where(active, slot, scratch), position, row_ids
            fields[ENTRY], fields[KV_LEN] = entry, kv_len
            fields[DEPTH], fields[TARGET] = torch.where(active, d, nr), target_state
            cont = phases.block(torch.stack(fields), tables[row_ids, stage])
            lengths.scatter_add_(1, stage[:, None], writes.long()[:, None])
            left = active & ~cont
            at_depth = active[:, None] & (d[:, None] == self.depths[None, :])            # [R, Nr]
            counts += torch.stack([at_depth.sum(0), (at_depth & left[:, None]).sum(0)])
            exit_depth = torch.where(left, d, exit_depth)
            depth = torch.where(active & cont, depth + 1, torch.where(left, -1, depth))
        self._record(self.out_occupancy, counts[0])
        self._record(self.out_exits, counts[1])

        left = depth == -1
        attends = phases.stage0_attention(stage0, row_ids, position, phases.epilogue_columns, left)
        logits = phases.epilogue(torch.where(left, slot, scratch), attends)
        new, logprob, valid = plain_tail(logits, self.temperature[:rows], self.seed[:rows], position + 1, sampling)
        record(self.out_tokens, torch.where(left, torch.where(valid, new, -2), -1))   # -2: the host fails the row
        record(self.out_depths, exit_depth)
        record(self.out_logprobs, logprob)
        token.copy_(torch.where(left, new, token))
        position.copy_(torch.where(left, position + 1, position))
        depth_state.copy_(torch.where(left, 0, depth))
        self.step += 1
