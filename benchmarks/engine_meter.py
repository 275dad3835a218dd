"""Measures one offline run of the engine without touching engine code: the runner's three kinds of
work (prologue, shared-block step, epilogue) are wrapped on the instance to time them (CUDA events
on a GPU, perf counters elsewhere) and to count the bytes an ideal implementation would read
(weights once per call, each visible K/V entry once per layer); a tick listener samples KV memory
(pages used x page bytes / tokens cached) and output tokens. Ticks run by the multi-step decode
loop are one device program, so a run that used it reports no per-phase times or ideal bytes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.mor_models import depth_fractions, kv_bytes_per_entry, weight_bytes
from morserve.engine import LLMEngine, SamplingParams, TickStats
from morserve.engine.sequence import Chunk


class PhaseTimer:
    """Time spent inside wrapped calls: CUDA events on a CUDA device (read once, at the end, so
    timing adds no synchronisation), perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.host_seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.host_seconds += time.perf_counter() - t0
            return out
        return timed

    def seconds(self) -> float:
        if not self.cuda:
            return self.host_seconds
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.events) / 1e3


@dataclass
class RunResult:
    """What one run measured (times in seconds, memory in bytes)."""

    output_tokens: int
    finished_requests: int
    seconds: float
    block_seconds: float | None            # None when the decode loop ran (its ticks are one graph)
    prologue_seconds: float | None
    epilogue_seconds: float | None
    bytes_read: float | None
    kv_bytes_per_token: dict[str, float]
    depth_fractions: list[float]
    preemptions: int
    peak_memory: int | None
    partial: bool
    ticks: int = 0


class EngineMeter:
    """Instruments `engine` (its runner methods are replaced on the instance) for one run."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        runner, model, cfg = engine.runner, engine.model, engine.model_config
        head = model.lm_head if model.lm_head is not None else model.embed_tokens   # read by the LM head
        self.blocks = engine.blocks
        self.entry_bytes = kv_bytes_per_entry(cfg, runner.dtype)
        self.page_bytes = self.entry_bytes * self.blocks.block_size
        self.stages = engine.stages
        self.weights = {"prologue": weight_bytes([*model.prologue]),
                        "block": weight_bytes([*model.block]),
                        "epilogue": weight_bytes([*model.epilogue, model.norm, head])}
        self.layers = {"prologue": len(model.prologue), "block": len(model.block), "epilogue": len(model.epilogue)}
        self.timers = {name: PhaseTimer(runner.device) for name in ("prologue", "block", "epilogue")}
        self.bytes_read = 0.0
        self.output_tokens = 0
        self.kv_sums = dict.fromkeys(("all", "block", "entries_all", "entries_block"), 0.0)
        self.kv_tokens_sum = 0
        self.ticks = 0
        runner.prologue = self._counted("prologue", runner.prologue, self._stage0_entries)
        runner.block_step = self._counted("block", runner.block_step, self._block_entries)
        runner.epilogue = self._counted("epilogue", runner.epilogue, self._stage0_entries)
        engine.tick_listeners.append(self._on_tick)
        self.loop_calls = 0
        if engine.decode_loop is not None:
            launch = engine.decode_loop.launch

            def counted_launch(*args, **kwargs):
                self.loop_calls += 1
                return launch(*args, **kwargs)
            engine.decode_loop.launch = counted_launch

    # ---- ideal bytes ----------------------------------------------------------------------
    def _counted(self, phase: str, fn: Callable, entries_of: Callable[[list[Chunk]], int]) -> Callable:
        timed = self.timers[phase].wrap(fn)
        per_entry = self.entry_bytes * self.layers[phase]

        def call(chunks: list[Chunk], *args):
            self.bytes_read += self.weights[phase] + per_entry * entries_of(chunks)
            return timed(chunks, *args)
        return call

    @staticmethod
    def _stage0_entries(chunks: list[Chunk]) -> int:
        """Stage-0 entries each chunk's tokens see (the sequence's first chunk.end tokens)."""
        return sum(c.end for c in chunks)

    def _block_entries(self, chunks: list[Chunk]) -> int:
        """Entries each chunk sees at its depth after this step's writes (share-first: depth 1's)."""
        total = 0
        for c in chunks:
            writes = c.num_active if self.stages.write_stage(c.depth) is not None else 0
            total += self.blocks.length(c.seq.seq_id, self.stages.read_stage(c.depth)) + writes
        return total

    # ---- per tick ---------------------------------------------------------------------------
    def _on_tick(self, stats: TickStats) -> None:
        self.ticks += 1
        self.output_tokens += stats.num_generated_tokens
        layers, block_size = self.blocks.layers_per_stage, self.blocks.block_size
        entries, blocks = [0] * len(layers), [0] * len(layers)
        for (_, stage), cache in self.blocks.tables.items():
            entries[stage] += cache.length
            blocks[stage] += -(-cache.length // block_size)
        if entries[0]:                      # every cached token has a stage-0 entry
            pages = [blocks[s] * layers[s] * self.page_bytes for s in range(len(layers))]
            used = [entries[s] * layers[s] * self.entry_bytes for s in range(len(layers))]
            for key, value in (("all", sum(pages)), ("block", sum(pages[1:])),
                               ("entries_all", sum(used)), ("entries_block", sum(used[1:]))):
                self.kv_sums[key] += value
            self.kv_tokens_sum += entries[0]

    def kv_per_token(self) -> dict[str, float]:
        """KV bytes per cached token, averaged over ticks: `all` / `block` = pages the entries occupy
        (rounded up to whole pages; pages the decode loop reserves ahead are not counted) (all layers /
        shared-block layers); `entries_*` = the same without page round-up."""
        return {k: v / self.kv_tokens_sum if self.kv_tokens_sum else 0.0 for k, v in self.kv_sums.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux), else None."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def greedy_params(max_tokens: int) -> SamplingParams:
    """Greedy with EOS ignored: every request produces exactly max_tokens tokens, the same ones in
    every mode (the paper's setting), so the modes' runs do identical work."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind="final_only")


def run_workload(engine: LLMEngine, requests: list[tuple[list[int], int]], time_cap: float | None = None,
                 progress: Callable[[int], None] | None = None) -> RunResult:
    """Queue every (prompt, output length) request at once, step until all finish (or `time_cap`
    seconds pass: then the rest is aborted and the result is marked partial), measure."""
    device = engine.runner.device
    meter = EngineMeter(engine)
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(f"bench-{i}", prompt, greedy_params(n))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    finished = 0
    partial = False
    while engine.has_unfinished_requests():
        done = sum(out.finished for out in engine.step())
        finished += done
        if progress is not None and done:
            progress(done)
        if time_cap is not None and time.perf_counter() - start > time_cap:
            partial = engine.has_unfinished_requests()
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    for rid in list(engine.requests):
        engine.abort_request(rid)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else current_rss()
    looped = meter.loop_calls > 0     # per-phase times and ideal bytes cover the per-tick path only
    return RunResult(output_tokens=meter.output_tokens, finished_requests=finished, seconds=seconds,
                     block_seconds=None if looped else meter.timers["block"].seconds(),
                     prologue_seconds=None if looped else meter.timers["prologue"].seconds(),
                     epilogue_seconds=None if looped else meter.timers["epilogue"].seconds(),
                     bytes_read=None if looped else meter.bytes_read, kv_bytes_per_token=meter.kv_per_token(),
                     depth_fractions=depth_fractions(engine.total_depth_token_ticks),
                     preemptions=engine.scheduler.num_preemptions, peak_memory=peak, partial=partial,
                     ticks=meter.ticks)
