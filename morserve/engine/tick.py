"""The device work of one engine tick, as three phases over flat batches of token rows, shared by
both drivers: the per-tick runner (runner.py: host bookkeeping, metadata built from chunks each
tick) and the multi-step decode loop (decode_loop.py: the batch state lives in device tensors and
K ticks are chained). The drivers differ only in where that state lives and how many ticks run.

1. `prologue`: embed, the unique first layer(s) (stage-0 K/V), store the rows in the hidden-state
   pool; the router kind records its per-token state at entry (token choice: the depth).
2. `block`: ONE pass of the shared block over a flat batch of tokens at mixed depths, as pure
   tensor work (no host sync, no data-dependent shapes: capturable as a CUDA graph). Inputs are a
   packed int64 metadata tensor `meta` [NUM_FIELDS, T] (fields below) and the block tables
   [G, M, layers] of the (sequence, depth) groups; it gathers the rows from the pool, runs the
   block's layers (each token stores its K/V at its own entry of its group and attends to the
   group's first kv_len entries, RoPE at its own position), lets the router kind update the rows
   and decide who continues, scatters them back, and counts tokens and exits per depth. Inert rows
   (padding, rows not in the pass: slot = the pool's scratch row, entry -1, kv_len 0, depth Nr)
   compute garbage that touches nothing but the scratch row and are not counted.
3. `epilogue`: the unique last layer(s) over pool rows, final norm and LM head over the rows that
   need logits; the greedy / plain-temperature tail is `sampler.plain_tail`.

Per-tick metadata is built once per phase: RoPE cos/sin are rows of a table made at start-up,
the slot mapping and per-layer tables of all the phase's layers come from one
`PagedKVCache.attend_fns` call. Which cache stage a depth writes and reads is CacheStages' rule.
"""

from __future__ import annotations

from typing import Callable

import torch

import kernels
from morserve.engine.kv_cache import PagedKVCache
from morserve.engine.stages import CacheStages
from morserve.model.layers import run_layers
from morserve.model.mor import MoRModel

# rows of the packed block-pass metadata tensor
SLOT, POSITION, GROUP, ENTRY, KV_LEN, DEPTH, TARGET = range(7)
NUM_FIELDS = 7


class TickPhases:
    """The hidden-state pool (`pool_size` rows, one per token in flight, plus the scratch row
    `scratch`), the router kind's per-token pool state, and the three phases over them."""

    def __init__(self, model: MoRModel, kv: PagedKVCache, stages: CacheStages, pool_size: int,
                 max_positions: int) -> None:
        self.model, self.kv, self.stages = model, kv, stages
        self.routing = model.routing
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model.config
        self.num_recursions = cfg.mor.num_recursions
        self.scratch = pool_size
        with torch.inference_mode():
            self.hidden = torch.zeros(pool_size + 1, cfg.hidden_size, dtype=self.dtype, device=self.device)
            self.entry = torch.zeros_like(self.hidden) if self.routing.keeps_entry else None
            self.score = (torch.zeros(pool_size + 1, dtype=torch.float32, device=self.device)
                          if self.routing.keeps_score else None)
            self.cos, self.sin = model.rope(torch.arange(max_positions, device=self.device), self.dtype)
            # each pool row's request overrides (engine/depth.py), written when its token enters
            self.depth_cap = torch.full((pool_size + 1,), self.num_recursions, dtype=torch.long, device=self.device)
            self.threshold = torch.full((pool_size + 1,), cfg.mor.routing_threshold, dtype=torch.float32,
                                        device=self.device)
            self.depths = torch.arange(1, self.num_recursions + 1, device=self.device)
        prologue, epilogue = len(model.prologue), len(model.epilogue)
        self.prologue_columns = range(prologue)
        self.epilogue_columns = range(prologue, prologue + epilogue)
        self.block_columns = range(len(model.block))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim] of the positions: rows of the start-up tables."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)

    def stage0_attention(self, tables: torch.Tensor, groups: torch.Tensor, positions: torch.Tensor,
                         columns: range, mask: torch.Tensor | None = None) -> list[Callable]:
        """Attention callbacks of stage-0 layers (table columns `columns`): every row writes entry
        `position` of its group's stage-0 table and sees entries 0..position; rows outside `mask`
        (when given) write and see nothing."""
        entries, kv_lens = positions, positions + 1
        if mask is not None:
            entries, kv_lens = torch.where(mask, entries, -1), torch.where(mask, kv_lens, 0)
        return self.kv.attend_fns(tables, groups, entries, kv_lens, columns)

    def set_routing(self, slots: torch.Tensor, caps: list[int], thresholds: list[float]) -> None:
        """Write the depth caps and expert thresholds of the tokens entering pool rows `slots`."""
        with torch.inference_mode():
            self.depth_cap.index_copy_(0, slots, torch.tensor(caps, dtype=torch.long).to(self.device))
            self.threshold.index_copy_(0, slots, torch.tensor(thresholds, dtype=torch.float32).to(self.device))

    # ---- the three phases ---------------------------------------------------------------------
    def prologue(self, ids: torch.Tensor, slots: torch.Tensor, attends: list[Callable], cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor | None:
        """Rows ids [T] into pool rows `slots` (their routing overrides written, set_routing); returns
        the chosen depths [T] (token choice) or None."""
        model = self.model
        h = run_layers(model.prologue, model.embed_tokens(ids), cos, sin, attends)
        kernels.scatter_rows(self.hidden, slots, h)
        target, score = self.routing.enter(model, h, self.depth_cap.index_select(0, slots))
        if self.entry is not None:
            kernels.scatter_rows(self.entry, slots, h)
        if score is not None:
            self.score.index_copy_(0, slots, score)
        return target

    def block(self, meta: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One block pass: meta [NUM_FIELDS, T] int64, tables [G, M, L] int32 -> (continue [T] bool,
        counts [2, Nr] int64: tokens of the pass and exits, per depth)."""
        model = self.model
        slots, depth = meta[SLOT], meta[DEPTH]
        h = kernels.gather_rows(self.hidden, slots)
        cos, sin = self.rope(meta[POSITION])
        attends = self.kv.attend_fns(tables, meta[GROUP], meta[ENTRY], meta[KV_LEN], self.block_columns)
        x = run_layers(model.block, h, cos, sin, attends)
        entry = kernels.gather_rows(self.entry, slots) if self.entry is not None else None
        score = self.score.index_select(0, slots) if self.score is not None else None
        new_h, cont, score = self.routing.update(model, h, x, depth, meta[TARGET], entry, score,
                                                 self.depth_cap.index_select(0, slots),
                                                 self.threshold.index_select(0, slots))
        kernels.scatter_rows(self.hidden, slots, new_h)
        if score is not None:
            self.score.index_copy_(0, slots, score)
        at_depth = (depth[:, None] == self.depths[None, :]) & (meta[KV_LEN] > 0)[:, None]     # [T, Nr]
        counts = torch.stack([at_depth.sum(0), (at_depth & ~cont[:, None]).sum(0)])
        return cont, counts

    def epilogue(self, slots: torch.Tensor, attends: list[Callable], cos: torch.Tensor, sin: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pool rows `slots` through the last layer(s); logits [R, V] of `rows` of them (all if None)."""
        model = self.model
        h = run_layers(model.epilogue, kernels.gather_rows(self.hidden, slots), cos, sin, attends)
        if rows is not None:
            h = h.index_select(0, rows)
        return model.logits(h)
