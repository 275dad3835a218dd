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
   in the pool and decide who continues, and returns the continue mask (per-depth counts are the
   drivers' job: they know the depths). Inert rows (padding, rows not in the pass: slot = the
   pool's scratch row, entry -1, kv_len 0, depth Nr) compute garbage that touches nothing but the
   scratch row.
3. `epilogue`: the unique last layer(s) over pool rows, final norm and LM head over the rows that
   need logits; the greedy / plain-temperature tail is `sampler.plain_tail`.

Nothing is built per layer or per phase beyond the packed metadata: the K/V store looks RoPE up
in the start-up tables by position and finds its cache slot from the block tables itself, and
each layer reads a strided view of its table column (`PagedKVCache.attend_fns`). A phase's first
norm is fused with its pool gather, its last residual add with the pool write and the router
kind's update (model/routing.py). Which cache stage a depth writes and reads is CacheStages' rule.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

import kernels
from morserve.engine.kv_cache import PagedKVCache
from morserve.engine.stages import CacheStages
from morserve.model.layers import DecoderLayer, run_layers
from morserve.model.mor import MoRModel
from morserve.model.routing import PoolRows

# rows of the packed block-pass metadata tensor
SLOT, POSITION, GROUP, ENTRY, KV_LEN, DEPTH, TARGET = range(7)
NUM_FIELDS = 7


class TickPhases:
    """The hidden-state pool (`pool_size` rows, one per token in flight, plus the scratch row
    `scratch`), the router kind's per-token pool state (`rows`), and the three phases over them."""

    def __init__(self, model: MoRModel, kv: PagedKVCache, stages: CacheStages, pool_size: int) -> None:
        self.model, self.kv, self.stages = model, kv, stages
        self.routing = model.routing
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        cfg = model.config
        self.num_recursions = cfg.mor.num_recursions
        self.scratch = pool_size
        with torch.inference_mode():
            hidden = torch.zeros(pool_size + 1, cfg.hidden_size, dtype=self.dtype, device=self.device)
            self.rows = PoolRows(
                hidden=hidden,
                entry=torch.zeros_like(hidden) if self.routing.keeps_entry else None,
                score=torch.zeros(pool_size + 1, dtype=torch.float32, device=self.device)
                if self.routing.keeps_score else None,
                # each pool row's request overrides (engine/depth.py), written when its token enters
                cap=torch.full((pool_size + 1,), self.num_recursions, dtype=torch.long, device=self.device),
                threshold=torch.full((pool_size + 1,), cfg.mor.routing_threshold, dtype=torch.float32,
                                     device=self.device))
        prologue, epilogue = len(model.prologue), len(model.epilogue)
        self.prologue_columns = range(prologue)
        self.epilogue_columns = range(prologue, prologue + epilogue)
        self.block_columns = range(len(model.block))

    def stage0_attention(self, tables: torch.Tensor, groups: torch.Tensor, positions: torch.Tensor,
                         columns: range, mask: torch.Tensor | None = None) -> list[Callable]:
        """Attention callbacks of stage-0 layers (table columns `columns`): every row writes entry
        `position` of its group's stage-0 table and sees entries 0..position; rows outside `mask`
        (when given) write and see nothing."""
        entries = positions if mask is None else torch.where(mask, positions, -1)
        return self.kv.attend_fns(tables, groups, entries, entries + 1, positions, columns)

    def set_routing(self, slots: torch.Tensor, caps: list[int], thresholds: list[float]) -> None:
        """Write the depth caps and expert thresholds of the tokens entering pool rows `slots`."""
        with torch.inference_mode():
            self.rows.cap.index_copy_(0, slots, torch.tensor(caps, dtype=torch.long).to(self.device))
            self.rows.threshold.index_copy_(0, slots, torch.tensor(thresholds, dtype=torch.float32).to(self.device))

    @staticmethod
    def _gather(layers: Sequence[DecoderLayer], pool: torch.Tensor,
                index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows `index` of `pool` and, when `layers` is not empty, their first input norm (one kernel)."""
        if not len(layers):
            return kernels.gather_rows(pool, index), None
        norm = layers[0].input_layernorm
        return kernels.gather_rows_rmsnorm(pool, index, norm.weight, norm.eps)

    # ---- the three phases ---------------------------------------------------------------------
    def prologue(self, ids: torch.Tensor, slots: torch.Tensor, attends: list[Callable]) -> torch.Tensor | None:
        """Rows ids [T] into pool rows `slots` (their routing overrides written, set_routing); returns
        the chosen depths [T] (token choice) or None."""
        model = self.model
        h, normed = self._gather(model.prologue, model.embed_tokens.weight, ids)      # the embedding is a gather
        x, residual = run_layers(model.prologue, h, attends, normed)
        return self.routing.enter(model, self.rows, slots, x, residual)

    def block(self, meta: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """One block pass: meta [NUM_FIELDS, T] int64, tables [G, M, L] int32 -> continue [T] bool."""
        model, slots = self.model, meta[SLOT]
        h, normed = self._gather(model.block, self.rows.hidden, slots)
        attends = self.kv.attend_fns(tables, meta[GROUP], meta[ENTRY], meta[KV_LEN], meta[POSITION], self.block_columns)
        x, residual = run_layers(model.block, h, attends, normed)
        return self.routing.update(model, self.rows, slots, x, residual, meta[DEPTH], meta[TARGET])

    def epilogue(self, slots: torch.Tensor, attends: list[Callable], rows: torch.Tensor | None = None) -> torch.Tensor:
        """Pool rows `slots` through the last layer(s); logits [R, V] of `rows` of them (all if None)."""
        model = self.model
        h, normed = self._gather(model.epilogue, self.rows.hidden, slots)
        x, residual = run_layers(model.epilogue, h, attends, normed)
        normed = model.norm(x) if residual is None else model.norm.add_forward(x, residual)[0]
        if rows is not None:
            normed = normed.index_select(0, rows)
        return model.head(normed)
