"""CUDA-graph capture (one recipe for every captured piece of work) and static-buffer, padded
execution of the block pass, replayed from CUDA graphs on CUDA.

`capture_graph(fn)`: warm-up on a side stream (compiles the Triton kernels, sizes workspaces), then
capture into a graph, optionally sharing a memory pool; the per-tick block pass and the decode
loop's whole tick both go through it.

A tick's block pass has a token count T that changes every tick. `GraphedBlockPass` owns static
metadata and block-table buffers, pads T up to the next captured size (padding rows are inert:
scratch pool row, no K/V write, nothing visible, final depth), copies the tick's metadata in with
one host-to-device copy per buffer, and replays the graph captured for that size. A size is
captured the first time a tick needs it (so an engine only pays for the sizes its load uses):
the buffers are filled with padding rows, which makes the warm-up run (it also compiles the Triton
kernels) and the capture inert for the hidden pool and the KV cache; all graphs share one memory
pool. With `capture=False` the same padded buffers run eagerly: that is how the padding logic is
tested on machines without a GPU.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from morserve.engine.tick import DEPTH, ENTRY, NUM_FIELDS, SLOT, TickPhases


def capture_graph(fn: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run `fn` once on a side stream (warm-up), then capture it; returns (graph, fn's output in
    the graph's memory). The caller makes `fn`'s inputs inert for both runs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def graph_sizes(max_tokens: int) -> list[int]:
    """Padded token counts to capture: 1, 2, 4, then steps of max(8, size / 8) up to max_tokens
    (padding wastes at most ~12% of a large batch)."""
    sizes = [s for s in (1, 2, 4) if s <= max_tokens]
    size = 8
    while size <= max_tokens:
        sizes.append(size)
        size += max(8, size // 8)
    if max_tokens > 0 and sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes


class GraphedBlockPass:
    """Callable like TickPhases.block but on host arrays: pads, copies into static buffers, replays."""

    def __init__(self, phases: TickPhases, sizes: list[int], max_width: int, layers: int,
                 capture: bool) -> None:
        if not sizes:
            raise ValueError("GraphedBlockPass needs at least one padded size")
        self.block_pass = phases.block
        self.sizes = sorted(set(sizes))
        self.max_width = max_width
        device = phases.device
        largest = self.sizes[-1]
        self.pad = np.zeros(NUM_FIELDS, dtype=np.int64)
        self.pad[SLOT], self.pad[ENTRY], self.pad[DEPTH] = phases.scratch, -1, phases.num_recursions
        with torch.inference_mode():
            self.meta = torch.from_numpy(np.repeat(self.pad[:, None], largest, axis=1)).to(device)
            self.tables = torch.zeros(largest, max_width, max(layers, 1), dtype=torch.int32, device=device)
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._pool = None

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def fits(self, num_tokens: int, width: int) -> bool:
        return num_tokens <= self.max_tokens and width <= self.max_width

    def _capture(self, size: int) -> None:
        meta, tables = self.meta[:, :size], self.tables[:size]
        meta.copy_(torch.from_numpy(np.repeat(self.pad[:, None], size, axis=1)))
        graph, self.outputs[size] = capture_graph(lambda: self.block_pass(meta, tables), self._pool)
        self._pool = graph.pool()
        self.graphs[size] = graph

    @torch.inference_mode()
    def __call__(self, meta: np.ndarray, tables: np.ndarray) -> torch.Tensor:
        """meta [NUM_FIELDS, T] int64 and tables [G, M, L] int32 (host arrays, fits() true) ->
        continue [T] bool on the device."""
        t = meta.shape[1]
        size = next(s for s in self.sizes if s >= t)
        if self.capture and size not in self.graphs:
            self._capture(size)
        padded = np.empty((NUM_FIELDS, size), dtype=np.int64)
        padded[:, :t] = meta
        padded[:, t:] = self.pad[:, None]
        self.meta[:, :size].copy_(torch.from_numpy(padded))
        g, m = tables.shape[:2]
        self.tables[:g, :m].copy_(torch.from_numpy(tables))
        if self.capture:
            self.graphs[size].replay()
            cont = self.outputs[size]
        else:
            cont = self.block_pass(self.meta[:, :size], self.tables[:size])
        return cont[:t]
