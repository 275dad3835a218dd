"""Per-tick statistics: what each tick did (TickStats), completed with the cache, queue, prefix-cache
and depth-policy gauges and published to the engine's listeners (metrics, benchmarks, tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from morserve.engine.depth_policy import DepthPolicy
from morserve.engine.kv_cache import BlockManager
from morserve.engine.scheduler import Scheduler


@dataclass
class TickStats:
    """What one tick did, for metrics and tests (index d-1 of the lists = depth d)."""

    num_block_tokens: int = 0
    num_prologue_tokens: int = 0
    num_epilogue_tokens: int = 0
    depth_occupancy: list[int] = field(default_factory=list)
    exits_per_depth: list[int] = field(default_factory=list)
    kv_blocks_used: dict[int, int] = field(default_factory=dict)
    kv_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0
    num_generated_tokens: int = 0
    num_block_steps: int = 0
    prefix_cache_queries: int = 0        # cumulative prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0           # cumulative of those found cached (vLLM's names)
    depth_cap: int = 0                   # the depth policy's cap for requests that allow reduction

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class TickRecorder:
    """Completes and publishes TickStats; keeps the last one and the running depth totals."""

    def __init__(self, num_recursions: int, blocks: BlockManager, scheduler: Scheduler,
                 depth_policy: DepthPolicy) -> None:
        self.num_recursions = num_recursions
        self.blocks, self.scheduler, self.depth_policy = blocks, scheduler, depth_policy
        self.listeners: list[Callable[[TickStats], None]] = []
        self.last = TickStats()
        self.total_depth_token_ticks = [0] * num_recursions

    def empty(self) -> TickStats:
        """A zero-work TickStats with per-depth lists of the model's length."""
        return TickStats(depth_occupancy=[0] * self.num_recursions, exits_per_depth=[0] * self.num_recursions)

    def add_block_step(self, stats: TickStats, occupancy: list[int], exits: list[int]) -> None:
        """Fold one block step's per-depth tokens and exits into the tick's stats."""
        stats.num_block_steps += 1
        for d, (occ, ex) in enumerate(zip(occupancy, exits)):
            stats.depth_occupancy[d] += occ
            stats.exits_per_depth[d] += ex
        stats.num_block_tokens = sum(stats.depth_occupancy)

    def record(self, stats: TickStats) -> None:
        """Add the gauges (KV pages, queues, preemptions) and publish."""
        stats.kv_blocks_used = dict(enumerate(self.blocks.blocks_used_per_stage()))
        stats.kv_usage = self.blocks.usage()
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.num_preemptions = self.scheduler.num_preemptions
        stats.depth_cap = self.depth_policy.cap
        if self.blocks.prefix is not None:
            stats.prefix_cache_queries, stats.prefix_cache_hits = self.blocks.prefix.queries, self.blocks.prefix.hits
        for d, occ in enumerate(stats.depth_occupancy):
            self.total_depth_token_ticks[d] += occ
        self.last = stats
        for listener in self.listeners:
            listener(stats)
