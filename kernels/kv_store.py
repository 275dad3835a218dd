"""Triton paged KV store: write a tick's K/V rows into the paged cache, optionally fused with RoPE.

Each row addresses its cache slot itself: entry `entries[t]` (-1: write nothing) of the block-table
row `query_group[t]` is page block_tables[g, e // page_size], offset e % page_size, so no slot
mapping is built per phase; `block_tables` may be a strided view (one layer column of a
[G, M, layers] table). With RoPE the row's cos/sin are looked up in the start-up tables [P, D] at
`positions[t]`. `store_kv` and `store_kv_rope` share one kernel (RoPE is a compile-time flag). One
program per token row moves all of that row's heads; rows that write nothing still produce their
roped q. Semantics and signatures are those of kernels.reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import check_index, check_tensors


@triton.jit
def _head_tile(num_heads, stride_h, stride_d, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Offsets and mask of one token's [num_heads, HEAD_DIM] tile."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    return h * stride_h + d * stride_d, (h < num_heads) & (d < HEAD_DIM)


@triton.jit
def _roped_tile(row, num_heads, stride_h, stride_d, cos, sin, HEAD_DIM: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """x * cos + rotate_half(x) * sin in float32 for the token tile at `row` (cos/sin: [BLOCK_D])."""
    offs, mask = _head_tile(num_heads, stride_h, stride_d, HEAD_DIM, BLOCK_H, BLOCK_D)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    first_half = d < HEAD_DIM // 2
    partner = tl.where(first_half, d + HEAD_DIM // 2, d - HEAD_DIM // 2)
    x = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(row + h * stride_h + partner * stride_d, mask=mask, other=0.0).to(tl.float32)
    return x * cos[None, :] + tl.where(first_half, -xp, xp) * sin[None, :]


@triton.jit
def _store_kv_kernel(k, v, k_cache, v_cache, block_tables, query_group, entries, q, cos, sin, positions, q_out,
                     num_heads, num_kv_heads, page_size,
                     stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                     stride_qt, stride_qh, stride_qd,
                     stride_cache_page, stride_cache_off, stride_cache_h, stride_cache_d,
                     stride_table_row, stride_table_col,
                     APPLY_ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    entry = tl.load(entries + t).to(tl.int64)
    keep = entry >= 0
    entry = tl.maximum(entry, 0)
    group = tl.load(query_group + t).to(tl.int64)
    page = tl.load(block_tables + group * stride_table_row + (entry // page_size) * stride_table_col,
                   mask=keep, other=0).to(tl.int64)
    cache_offs, cache_mask = _head_tile(num_kv_heads, stride_cache_h, stride_cache_d, HEAD_DIM, BLOCK_HKV, BLOCK_D)
    cache_offs = cache_offs + page * stride_cache_page + (entry % page_size) * stride_cache_off
    cache_mask = cache_mask & keep
    k_offs, kv_mask = _head_tile(num_kv_heads, stride_kh, stride_kd, HEAD_DIM, BLOCK_HKV, BLOCK_D)
    if APPLY_ROPE:
        d = tl.arange(0, BLOCK_D)
        position = tl.load(positions + t).to(tl.int64)
        cos_row = tl.load(cos + position * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        sin_row = tl.load(sin + position * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        q_roped = _roped_tile(q + t * stride_qt, num_heads, stride_qh, stride_qd, cos_row, sin_row,
                              HEAD_DIM, BLOCK_H, BLOCK_D)
        q_offs, q_mask = _head_tile(num_heads, HEAD_DIM, 1, HEAD_DIM, BLOCK_H, BLOCK_D)
        tl.store(q_out + t * num_heads * HEAD_DIM + q_offs, q_roped.to(q_out.dtype.element_ty), mask=q_mask)
        # rounded to k's dtype first, as the reference's roped k is
        k_row = _roped_tile(k + t * stride_kt, num_kv_heads, stride_kh, stride_kd, cos_row, sin_row,
                            HEAD_DIM, BLOCK_HKV, BLOCK_D).to(k.dtype.element_ty)
    else:
        k_row = tl.load(k + t * stride_kt + k_offs, mask=kv_mask & keep)
    tl.store(k_cache + cache_offs, k_row.to(k_cache.dtype.element_ty), mask=cache_mask)
    v_offs, _ = _head_tile(num_kv_heads, stride_vh, stride_vd, HEAD_DIM, BLOCK_HKV, BLOCK_D)
    v_row = tl.load(v + t * stride_vt + v_offs, mask=kv_mask & keep)
    tl.store(v_cache + cache_offs, v_row.to(v_cache.dtype.element_ty), mask=cache_mask)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            positions: torch.Tensor, q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            block_tables: torch.Tensor, query_group: torch.Tensor, entries: torch.Tensor, apply_rope: bool) -> None:
    op = "store_kv_rope" if apply_rope else "store_kv"
    check_tensors(op, q, k, v, cos, sin, positions, k_cache, v_cache, block_tables, query_group, entries)
    t, hkv, d = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != (hkv, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)} "
                         f"/ {tuple(v_cache.shape)} do not match [T, Hkv, D] / [pages, block, Hkv, D]")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"{op}: k_cache and v_cache must share one layout")
    check_index(op, query_group)
    check_index(op, entries)
    if query_group.shape != (t,) or entries.shape != (t,) or block_tables.dim() != 2:
        raise ValueError(f"{op}: query_group {tuple(query_group.shape)} and entries {tuple(entries.shape)} must be "
                         f"[T={t}], block_tables [groups, pages] (got {tuple(block_tables.shape)})")
    if t == 0:
        return
    h = q.shape[1]
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, block_tables, query_group, entries, q, cos, sin, positions, q_out,
                           h, hkv, k_cache.shape[1], *k.stride(), *v.stride(), *q.stride(), *k_cache.stride(),
                           *block_tables.stride(),
                           APPLY_ROPE=apply_rope, HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(h),
                           BLOCK_HKV=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
                           num_warps=4)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             block_tables: torch.Tensor, query_group: torch.Tensor, entries: torch.Tensor) -> None:
    """Write k/v [T, Hkv, D] at entry entries[t] of table row query_group[t]; entry -1 skips the row."""
    _launch(k, k, v, k, k, entries, k, k_cache, v_cache, block_tables, query_group, entries, apply_rope=False)


def store_kv_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, query_group: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """RoPE (half rotation; cos/sin: start-up tables [P, D], row positions[t]) on q [T, H, D] and
    k [T, Hkv, D], then store_kv of the roped k and v; returns the roped q (new, contiguous)."""
    t, _, d = q.shape
    if cos.dim() != 2 or cos.shape[1] != d or sin.shape != cos.shape or k.shape[0] != t or k.shape[2] != d or d % 2:
        raise ValueError(f"store_kv_rope: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)} do not match [T, H, D], [T, Hkv, D], [P, D] with D even")
    check_index("store_kv_rope", positions)
    if positions.shape != (t,):
        raise ValueError(f"store_kv_rope: positions must be [T={t}], got {tuple(positions.shape)}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch(q, k, v, cos.contiguous(), sin.contiguous(), positions, q_out, k_cache, v_cache, block_tables,
            query_group, entries, apply_rope=True)
    return q_out
