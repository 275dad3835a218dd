"""Triton bookkeeping of the multi-step decode loop: a tick's row-state updates in three launches.

The decode loop (morserve/engine/decode_loop.py) keeps one row per sequence on the device (live,
depth, slot, position, target, per-stage K/V lengths, and per-tick records at the device counter
`step`); vLLM's `advance_step` is the precedent of updating such a state in one launch. Around the
tick's phases:
- `loop_prologue_rows`: the prologue's stage-0 rows (slots, entries, kv_lens) of the first tick
  after the state was loaded (each tick's `loop_emit` writes those of the next one);
- `loop_block_meta`: before each block pass: the prologue's rows enter the block (first pass), the
  cache-stage rule gives each row of the pass its stage, entry and kv_len, lengths and the
  per-depth occupancy are updated, and the pass's packed metadata is written;
- `loop_block_exit`: after each block pass: depths advance or rows leave (exits per depth), and
  the epilogue's stage-0 rows;
- `loop_emit`: after the LM-head tail: the tick's records, the next token in flight, step += 1,
  and the next tick's prologue rows.

Each kernel is ONE program over all R rows (R is the loop's row count, at most max_num_seqs), so
the per-depth counts are plain reductions and no atomics are needed; where a kernel reads and
then rewrites a shared word (a count, the step counter), a barrier orders every thread's read
before the write. Every shape is fixed and nothing syncs with the host: the kernels run inside
the tick's CUDA graph. Semantics and signatures are those of kernels.reference (whose docstrings
define the state); the cache-stage rule is CacheStages' (morserve/engine/stages.py), selected by
the SHARE_FIRST constexpr.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import check_tensors

_MIN_BLOCK_R = 16


@triton.jit
def _row_state(live, depth, rows, in_rows):
    """(live [BLOCK_R] bool, depth [BLOCK_R] int64) of the rows; rows past R are dead, depth 0."""
    return (tl.load(live + rows, mask=in_rows, other=0) != 0), tl.load(depth + rows, mask=in_rows, other=0)


@triton.jit
def _store_stage0_rows(rows, in_rows, use, slot, position, scratch, slots_out, entries_out, kv_lens_out):
    """Stage-0 metadata over the rows `use` selects: slot (scratch elsewhere), entry = position
    (-1 elsewhere), kv_len = position + 1 (0 elsewhere)."""
    tl.store(slots_out + rows, tl.where(use, slot, scratch), mask=in_rows)
    tl.store(entries_out + rows, tl.where(use, position, -1), mask=in_rows)
    tl.store(kv_lens_out + rows, tl.where(use, position + 1, 0), mask=in_rows)


@triton.jit
def _cache_stage(depth, active, SHARE_FIRST: tl.constexpr):
    """CacheStages' rule (kernels.reference.cache_stage_fields): (stage read, writes) of rows at
    block depth `depth`. Recursion-wise stage = depth and every active row writes; share-first
    stage 1, and only depth 1 writes."""
    if SHARE_FIRST:
        stage, writes = tl.full(depth.shape, 1, tl.int64), active & (depth == 1)
    else:
        stage, writes = depth, active
    return stage, writes


@triton.jit
def _depth_counts(rows_counted, depth, BLOCK_NR: tl.constexpr):
    """[BLOCK_NR] int64: how many of the rows counted are at depth 1, 2, ..."""
    depths = tl.arange(0, BLOCK_NR)
    hit = rows_counted[:, None] & (depth[:, None] == depths[None, :] + 1)
    return tl.sum(hit.to(tl.int64), axis=0)


@triton.jit
def _add_counts(counts_row, counts, num_recursions, BLOCK_NR: tl.constexpr):
    """counts_row[:num_recursions] += counts (read by every thread before any writes)."""
    depths = tl.arange(0, BLOCK_NR)
    keep = depths < num_recursions
    total = counts + tl.load(counts_row + depths, mask=keep, other=0)
    tl.debug_barrier()
    tl.store(counts_row + depths, total, mask=keep)


@triton.jit
def _prologue_rows_kernel(live, depth, slot, position, slots_out, entries_out, kv_lens_out, r, scratch,
                          BLOCK_R: tl.constexpr):
    rows = tl.arange(0, BLOCK_R)
    in_rows = rows < r
    alive, dep = _row_state(live, depth, rows, in_rows)
    pos = tl.load(position + rows, mask=in_rows, other=0)
    _store_stage0_rows(rows, in_rows, alive & (dep == 0), tl.load(slot + rows, mask=in_rows, other=0), pos,
                       scratch, slots_out, entries_out, kv_lens_out)


@triton.jit
def _block_meta_kernel(live, depth, slot, position, target, lengths, entered_target, prologue_counts, occupancy,
                       exits, step, slot_out, position_out, group_out, entry_out, kv_len_out, depth_out, target_out,
                       r, stages, stride_lengths, stride_counts, stride_prologue, scratch, num_recursions,
                       SHARE_FIRST: tl.constexpr, ENTER: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_NR: tl.constexpr):
    rows = tl.arange(0, BLOCK_R)
    in_rows = rows < r
    s = tl.load(step)
    alive, dep = _row_state(live, depth, rows, in_rows)
    pos = tl.load(position + rows, mask=in_rows, other=0)
    tgt = tl.load(target + rows, mask=in_rows, other=0)
    row_lengths = lengths + rows.to(tl.int64) * stride_lengths
    if ENTER:
        fresh = alive & (dep == 0)
        dep = tl.where(fresh, 1, dep)
        tgt = tl.where(fresh, tl.load(entered_target + rows, mask=in_rows, other=0), tgt)
        tl.store(depth + rows, dep, mask=in_rows)
        tl.store(target + rows, tgt, mask=in_rows)
        tl.store(row_lengths, pos + 1, mask=fresh)
        tl.store(prologue_counts + s * stride_prologue, tl.sum(fresh.to(tl.int64), axis=0))
        depths = tl.arange(0, BLOCK_NR)
        tl.store(exits + s * stride_counts + depths, tl.zeros([BLOCK_NR], tl.int64), mask=depths < num_recursions)
    active = alive & (dep >= 1)
    d = tl.minimum(tl.maximum(dep, 1), num_recursions)
    stage, writes = _cache_stage(d, active, SHARE_FIRST)
    entry = tl.where(writes, tl.load(row_lengths + stage, mask=writes, other=0), -1)
    tl.store(row_lengths + stage, entry + 1, mask=writes)
    tl.store(slot_out + rows, tl.where(active, tl.load(slot + rows, mask=in_rows, other=0), scratch), mask=in_rows)
    tl.store(position_out + rows, pos, mask=in_rows)
    tl.store(group_out + rows, rows.to(tl.int64) * stages + stage, mask=in_rows)
    tl.store(entry_out + rows, entry, mask=in_rows)
    tl.store(kv_len_out + rows, tl.where(active, tl.where(writes, entry + 1, pos + 1), 0), mask=in_rows)
    tl.store(depth_out + rows, tl.where(active, d, num_recursions), mask=in_rows)
    tl.store(target_out + rows, tgt, mask=in_rows)
    counts = _depth_counts(active, d, BLOCK_NR)
    occupancy_row = occupancy + s * stride_counts
    if ENTER:
        depths = tl.arange(0, BLOCK_NR)
        tl.store(occupancy_row + depths, counts, mask=depths < num_recursions)
    else:
        _add_counts(occupancy_row, counts, num_recursions, BLOCK_NR)


@triton.jit
def _block_exit_kernel(live, depth, cont, slot, position, exits, step, slots_out, entries_out, kv_lens_out,
                       r, stride_counts, num_recursions, scratch, BLOCK_R: tl.constexpr, BLOCK_NR: tl.constexpr):
    rows = tl.arange(0, BLOCK_R)
    in_rows = rows < r
    s = tl.load(step)
    alive, dep = _row_state(live, depth, rows, in_rows)
    active = alive & (dep >= 1)
    d = tl.minimum(tl.maximum(dep, 1), num_recursions)
    goes_on = tl.load(cont + rows, mask=in_rows, other=0) != 0
    left = active & (goes_on == 0)
    _add_counts(exits + s * stride_counts, _depth_counts(left, d, BLOCK_NR), num_recursions, BLOCK_NR)
    dep = tl.where(active & goes_on, dep + 1, tl.where(left, -d, dep))
    tl.store(depth + rows, dep, mask=in_rows)
    _store_stage0_rows(rows, in_rows, dep < 0, tl.load(slot + rows, mask=in_rows, other=0),
                       tl.load(position + rows, mask=in_rows, other=0), scratch, slots_out, entries_out, kv_lens_out)


@triton.jit
def _emit_kernel(live, depth, slot, position, token, new, logprob, valid, out_tokens, out_depths, out_logprobs,
                 step, slots_out, entries_out, kv_lens_out, r, stride_tokens, stride_depths, stride_logprobs, scratch,
                 BLOCK_R: tl.constexpr):
    rows = tl.arange(0, BLOCK_R)
    in_rows = rows < r
    s = tl.load(step)
    alive, dep = _row_state(live, depth, rows, in_rows)
    left = dep < 0
    drawn = tl.load(new + rows, mask=in_rows, other=0)
    usable = tl.load(valid + rows, mask=in_rows, other=0) != 0
    tl.store(out_tokens + s * stride_tokens + rows, tl.where(left, tl.where(usable, drawn, -2), -1), mask=in_rows)
    tl.store(out_depths + s * stride_depths + rows, tl.where(left, -dep, 0), mask=in_rows)
    tl.store(out_logprobs + s * stride_logprobs + rows, tl.load(logprob + rows, mask=in_rows, other=0.0),
             mask=in_rows)
    tl.store(token + rows, tl.where(left, drawn, tl.load(token + rows, mask=in_rows, other=0)), mask=in_rows)
    pos = tl.load(position + rows, mask=in_rows, other=0) + left.to(tl.int64)
    dep = tl.maximum(dep, 0)
    tl.store(position + rows, pos, mask=in_rows)
    tl.store(depth + rows, dep, mask=in_rows)
    _store_stage0_rows(rows, in_rows, alive & (dep == 0), tl.load(slot + rows, mask=in_rows, other=0), pos, scratch,
                       slots_out, entries_out, kv_lens_out)
    tl.debug_barrier()
    tl.store(step, s + 1)


# ---- launch wrappers ---------------------------------------------------------------------------

def _rows(op: str, *rows: torch.Tensor) -> int:
    """R, after checking that each per-row tensor is a contiguous [R] vector."""
    r = rows[0].shape[0]
    for t in rows:
        if t.dim() != 1 or t.shape[0] != r or t.stride(0) != 1:
            raise ValueError(f"{op}: per-row tensors must be contiguous [{r}] vectors, got {tuple(t.shape)} "
                             f"stride {t.stride()}")
    return r


def _block_r(r: int) -> int:
    return max(triton.next_power_of_2(max(r, 1)), _MIN_BLOCK_R)


def _warps(block_r: int) -> int:
    return min(max(block_r // 128, 1), 8)


def _block_nr(num_recursions: int) -> int:
    return max(triton.next_power_of_2(num_recursions), 2)


def _stage0_outputs(r: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty(r, dtype=torch.long, device=device), torch.empty(r, dtype=torch.long, device=device),
            torch.empty(r, dtype=torch.long, device=device))


def _check_stage0_outputs(op: str, r: int, slots: torch.Tensor, entries: torch.Tensor, kv_lens: torch.Tensor) -> None:
    _rows(op, slots, entries, kv_lens)
    if slots.shape[0] != r or (slots.dtype, entries.dtype, kv_lens.dtype) != (torch.long, torch.long, torch.long):
        raise ValueError(f"{op}: slots, entries, kv_lens must be [{r}] int64, got {slots.dtype} "
                         f"{tuple(slots.shape)}, {entries.dtype}, {kv_lens.dtype}")


def loop_prologue_rows(live: torch.Tensor, depth: torch.Tensor, slot: torch.Tensor, position: torch.Tensor,
                       scratch: int, slots: torch.Tensor, entries: torch.Tensor, kv_lens: torch.Tensor) -> None:
    """The prologue's stage-0 rows (the live rows at depth 0) into slots, entries, kv_lens (int64)."""
    check_tensors("loop_prologue_rows", live, depth, slot, position, slots, entries, kv_lens)
    r = _rows("loop_prologue_rows", live, depth, slot, position)
    _check_stage0_outputs("loop_prologue_rows", r, slots, entries, kv_lens)
    block_r = _block_r(r)
    _prologue_rows_kernel[(1,)](live, depth, slot, position, slots, entries, kv_lens, r, scratch, BLOCK_R=block_r,
                                num_warps=_warps(block_r))


def loop_block_meta(live: torch.Tensor, depth: torch.Tensor, slot: torch.Tensor, position: torch.Tensor,
                    target: torch.Tensor, lengths: torch.Tensor, entered_target: torch.Tensor,
                    prologue_counts: torch.Tensor, occupancy: torch.Tensor, exits: torch.Tensor, step: torch.Tensor,
                    scratch: int, num_recursions: int, share_first: bool, enter: bool) -> torch.Tensor:
    """Before a block pass (state in place, see kernels.reference): returns meta [7, R] int64."""
    from morserve.engine.tick import DEPTH, ENTRY, GROUP, KV_LEN, NUM_FIELDS, POSITION, SLOT, TARGET  # deferred

    op = "loop_block_meta"
    check_tensors(op, live, depth, slot, position, target, lengths, entered_target, prologue_counts, occupancy,
                  exits, step)
    r = _rows(op, live, depth, slot, position, target, entered_target)
    if lengths.shape[0] != r or lengths.stride(1) != 1 or occupancy.stride() != exits.stride() \
            or occupancy.stride(1) != 1:
        raise ValueError(f"{op}: lengths must be [{r}, stages] with contiguous rows and occupancy / exits "
                         "[steps, Nr] alike")
    meta = torch.empty(NUM_FIELDS, r, dtype=torch.long, device=live.device)
    fields = [meta[i] for i in (SLOT, POSITION, GROUP, ENTRY, KV_LEN, DEPTH, TARGET)]
    block_r = _block_r(r)
    _block_meta_kernel[(1,)](live, depth, slot, position, target, lengths, entered_target, prologue_counts,
                             occupancy, exits, step, *fields, r, lengths.shape[1], lengths.stride(0),
                             occupancy.stride(0), prologue_counts.stride(0), scratch, num_recursions,
                             SHARE_FIRST=share_first, ENTER=enter, BLOCK_R=block_r, BLOCK_NR=_block_nr(num_recursions),
                             num_warps=_warps(block_r))
    return meta


def loop_block_exit(live: torch.Tensor, depth: torch.Tensor, cont: torch.Tensor, slot: torch.Tensor,
                    position: torch.Tensor, exits: torch.Tensor, step: torch.Tensor, num_recursions: int,
                    scratch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """After a block pass (state in place): returns the epilogue's stage-0 (slots, entries, kv_lens)."""
    check_tensors("loop_block_exit", live, depth, cont, slot, position, exits, step)
    r = _rows("loop_block_exit", live, depth, cont, slot, position)
    out = _stage0_outputs(r, live.device)
    block_r = _block_r(r)
    _block_exit_kernel[(1,)](live, depth, cont, slot, position, exits, step, *out, r, exits.stride(0),
                             num_recursions, scratch, BLOCK_R=block_r, BLOCK_NR=_block_nr(num_recursions),
                             num_warps=_warps(block_r))
    return out


def loop_emit(live: torch.Tensor, depth: torch.Tensor, slot: torch.Tensor, position: torch.Tensor,
              token: torch.Tensor, new: torch.Tensor, logprob: torch.Tensor, valid: torch.Tensor,
              out_tokens: torch.Tensor, out_depths: torch.Tensor, out_logprobs: torch.Tensor, step: torch.Tensor,
              scratch: int, slots: torch.Tensor, entries: torch.Tensor, kv_lens: torch.Tensor) -> None:
    """The end of a tick (state, records and the next tick's prologue rows in place, see
    kernels.reference); step += 1."""
    op = "loop_emit"
    check_tensors(op, live, depth, slot, position, token, new, logprob, valid, out_tokens, out_depths, out_logprobs,
                  step, slots, entries, kv_lens)
    r = _rows(op, live, depth, slot, position, token, new, logprob, valid)
    _check_stage0_outputs(op, r, slots, entries, kv_lens)
    for out in (out_tokens, out_depths, out_logprobs):
        if out.dim() != 2 or out.shape[1] != r or out.stride(1) != 1:
            raise ValueError(f"{op}: records must be [steps, {r}] with contiguous rows, got "
                             f"{tuple(out.shape)} stride {out.stride()}")
    if out_logprobs.dtype != torch.float32:
        raise ValueError(f"{op}: out_logprobs must be float32, got {out_logprobs.dtype}")
    block_r = _block_r(r)
    _emit_kernel[(1,)](live, depth, slot, position, token, new, logprob, valid, out_tokens, out_depths, out_logprobs,
                       step, slots, entries, kv_lens, r, out_tokens.stride(0), out_depths.stride(0),
                       out_logprobs.stride(0), scratch, BLOCK_R=block_r, num_warps=_warps(block_r))
