"""The cache-stage map: which KV cache stage a layer group writes and reads at each recursion depth.

Stage 0 holds the prologue and epilogue layers (every token writes one entry there, at its
position). The shared block's layers have one stage per depth with recursion-wise caching
(kv_mode `recursion`: a token at depth d writes the next entry of stage d and attends to the
stage-d entries written before it), or one stage with share-first (kv_mode `share_first`: only
depth 1 writes; deeper recursions read depth 1's entries, all of them up to the token's position).

This class is the one place that knows the rule: the BlockManager's page accounting, the per-tick
runner's host metadata, the decode loop's device metadata and the engine's worst-case page bounds
all ask it (`write_stage`, `read_stage`, `share_first`). On the device the rule is one function
of the depth and `share_first`, in its two forms of the kernels package:
`kernels.reference.cache_stage_fields` and the decode loop's fused bookkeeping kernel
(`kernels.loop_block_meta`, its SHARE_FIRST constexpr set from `share_first` here), tested
against each other and against the host rule (tests/test_loop_state.py).
"""

from __future__ import annotations

from morserve.config import ModelConfig


class CacheStages:
    """`layers_per_stage[s]`: how many layers stage s holds (one page per layer per block)."""

    def __init__(self, cfg: ModelConfig) -> None:
        mor = cfg.mor
        self.num_recursions = mor.num_recursions
        self.share_first = mor.kv_mode == "share_first"
        block_stages = 1 if self.share_first else mor.num_recursions
        self.layers_per_stage = [cfg.num_prologue_layers + cfg.num_epilogue_layers]
        self.layers_per_stage += [cfg.num_block_layers] * block_stages

    @property
    def num_stages(self) -> int:
        return len(self.layers_per_stage)

    # ---- host side ----------------------------------------------------------------------------
    def write_stage(self, depth: int) -> int | None:
        """The stage a token at block depth `depth` (1..Nr) writes its K/V to, None if it writes none."""
        if self.share_first:
            return 1 if depth == 1 else None
        return depth

    def read_stage(self, depth: int) -> int:
        """The stage a token at block depth `depth` attends to."""
        return 1 if self.share_first else depth

    def worst_pages(self, tokens: int, block_size: int) -> int:
        """Pages a sequence of `tokens` tokens may hold at most, over every stage."""
        return sum(-(-tokens // block_size) * layers for layers in self.layers_per_stage)

    def entries_bound(self, ticks: int, depth_sync: bool) -> list[int]:
        """The most K/V entries one decoding sequence can write per stage in `ticks` ticks. Stage 0:
        one token per tick. Depth-wise, a token spends one tick per recursion and the next token
        enters after it left, so a row's writes at depth d are at least d ticks apart:
        ceil(ticks / d). Depth-synchronous ticks take a token through every depth: ticks."""
        if depth_sync or self.share_first:
            return [ticks] * self.num_stages
        return [ticks] + [-(-ticks // d) for d in range(1, self.num_stages)]
