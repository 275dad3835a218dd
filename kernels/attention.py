"""Triton paged recursion-wise attention over a whole mixed batch: query tiles, split-KV, one
page-table entry per page, software-pipelined K/V loads.

Every query row t carries its own group (query_group[t] -> a block-table row, i.e. one sequence at
one recursion depth) and its own visible length kv_lens[t]; decode rows and causally masked
prefill-chunk rows are therefore the same thing to the kernel. Semantics and signature are those
of kernels.reference.paged_attention.

- Query tiles. Program (t, kv head, split) leads a tile when row t starts a run of rows of one
  group inside its BLOCK_Q-aligned block of rows; it then serves every row of that run (a prefill
  chunk's consecutive rows share each K/V tile load; rows of one decode group are one row). The
  M dimension of the dot products is (tile row, query head of the GQA group). Any row order is
  served correctly; rows of a chunk that are contiguous (the engine's layout) share their loads.
- Pages. The loop walks the tile's visible entries BLOCK_N at a time, loading one page id per page
  (BLOCK_N / PAGE_SIZE ids per step, or one id for BLOCK_N entries of a larger page) and each
  page's keys as contiguous rows. `tl.range(..., num_stages=NUM_STAGES)` lets the compiler
  pipeline the page-id, K and V loads of the next steps into separate shared-memory buffers.
- Split-KV (flash-decoding). With few programs for the device (few rows, i.e. decode of few long
  sequences), each tile's entries are cut into NUM_SPLITS ranges computed by separate programs
  that store a normalised partial output and its log-sum-exp; `_combine_kernel` merges them.
Online softmax in float32 (exp2 domain); offsets are widened to int64 before stride multiplies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import INTERPRETED, check_tensors

_LOG2E = 1.4426950408889634
TARGET_PROGRAMS = 264          # 2 programs per SM of an H100/H200 (132 SMs): split KV below this
MAX_SPLITS = 16


@triton.jit
def _attention_kernel(q, k_cache, v_cache, block_tables, query_group, kv_lens, out, part_out, part_lse,
                      num_rows, qk_scale,
                      stride_qt, stride_qh, stride_qd,
                      stride_cache_page, stride_cache_off, stride_cache_h, stride_cache_d,
                      stride_table_row, stride_table_col,
                      NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                      PAGE_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                      NUM_STAGES: tl.constexpr, KV_ALIGN: tl.constexpr, UPCAST: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    t0 = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    group = tl.load(query_group + t0)
    # lead a tile iff row t0 starts a run of its group within its BLOCK_Q-aligned block
    prev_group = tl.load(query_group + tl.maximum(t0 - 1, 0))
    if (t0 % BLOCK_Q == 0) | (prev_group != group):
        BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_G
        offs_m = tl.arange(0, BLOCK_M)
        tile_row = offs_m // BLOCK_G                                     # row within the tile
        head_in_group = offs_m % BLOCK_G
        offs_d = tl.arange(0, BLOCK_D)
        # rows t0 .. t0 + n_rows - 1: consecutive, same group, before the end of the aligned block
        offs_q = tl.arange(0, BLOCK_Q)
        cand = t0 + offs_q
        in_block = (cand < num_rows) & (cand < (t0 // BLOCK_Q + 1) * BLOCK_Q)
        cand_group = tl.load(query_group + cand, mask=in_block, other=-1)
        n_rows = tl.min(tl.where(cand_group != group, offs_q, BLOCK_Q), axis=0)
        row_lens = tl.load(kv_lens + cand, mask=offs_q < n_rows, other=0).to(tl.int32)  # 32-bit loop bounds
        max_len = tl.max(row_lens, axis=0)

        rows = (t0 + tile_row).to(tl.int64)
        heads = kv_head * GROUP + head_in_group
        m_valid = (tile_row < n_rows) & (head_in_group < GROUP)
        d_mask = offs_d < HEAD_DIM
        q_mask = m_valid[:, None] & d_mask[None, :]
        q_tile = tl.load(q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                         mask=q_mask, other=0.0)
        if UPCAST:
            q_tile = q_tile.to(tl.float32)
        m_lens = tl.load(kv_lens + rows, mask=m_valid, other=0)           # visible entries per M row

        # this split's entries: a contiguous range of whole BLOCK_N steps
        steps = tl.cdiv(max_len, BLOCK_N)
        per_split = tl.cdiv(steps, NUM_SPLITS)
        lo = split * per_split * BLOCK_N
        hi = tl.minimum(max_len, lo + per_split * BLOCK_N)

        PAGES: tl.constexpr = BLOCK_N // PAGE_SIZE if BLOCK_N >= PAGE_SIZE else 1
        KEYS: tl.constexpr = BLOCK_N // PAGES                                # keys per loaded page
        offs_page = tl.arange(0, PAGES)
        offs_key = tl.arange(0, KEYS)
        offs_n = tl.arange(0, BLOCK_N)
        table = block_tables + group.to(tl.int64) * stride_table_row
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        page_idx = lo // PAGE_SIZE + offs_page
        page = tl.load(table + page_idx * stride_table_col, mask=page_idx * PAGE_SIZE < hi, other=0)
        for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
            # the next step's page ids are loaded one step ahead, so the K/V addresses come from a
            # loop-carried value: the compiler then multi-buffers the K/V copies NUM_STAGES - 1 deep
            page_idx = (start + BLOCK_N) // PAGE_SIZE + offs_page
            next_page = tl.load(table + page_idx * stride_table_col, mask=page_idx * PAGE_SIZE < hi, other=0)
            key_offs = (page.to(tl.int64) * stride_cache_page)[:, None] + \
                ((start % PAGE_SIZE + offs_key) * stride_cache_off)[None, :]
            # reshape drops the divisibility facts; restoring them lets the K/V loads be async copies
            key_offs = tl.multiple_of(tl.reshape(key_offs, [BLOCK_N]) + kv_head * stride_cache_h, KV_ALIGN)
            pos = start + offs_n
            kv_offs = key_offs[:, None] + offs_d[None, :] * stride_cache_d
            kv_mask = (pos < hi)[:, None] & d_mask[None, :]
            k_tile = tl.load(k_cache + kv_offs, mask=kv_mask, other=0.0)
            v_tile = tl.load(v_cache + kv_offs, mask=kv_mask, other=0.0)
            if UPCAST:
                k_tile = k_tile.to(tl.float32)
                v_tile = v_tile.to(tl.float32)
            s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale  # log2 domain
            s = tl.where(pos[None, :] < m_lens[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)           # rows that saw nothing yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
            m_i = m_new
            page = next_page

        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                      # rows that see nothing: zeros
        out_offs = rows[:, None] * (NUM_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + offs_d[None, :]
        if NUM_SPLITS == 1:
            tl.store(out + out_offs, o.to(out.dtype.element_ty), mask=q_mask)
        else:
            part = split.to(tl.int64) * num_rows * NUM_HEADS * HEAD_DIM
            tl.store(part_out + part + out_offs, o, mask=q_mask)
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(part_lse + split.to(tl.int64) * num_rows * NUM_HEADS + rows * NUM_HEADS + heads, lse,
                     mask=m_valid)


@triton.jit
def _combine_kernel(part_out, part_lse, out, num_rows, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = the splits' partial outputs of row t weighted by their softmax mass (2^lse)."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < NUM_HEADS
    mask = h_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    lse_row = part_lse + t * NUM_HEADS + offs_h
    lse_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(lse_row + s * num_rows * NUM_HEADS, mask=h_mask, other=float("-inf")))
    lse_safe = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    offs = t * NUM_HEADS * HEAD_DIM + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    for s in tl.static_range(NUM_SPLITS):
        w = tl.exp2(tl.load(lse_row + s * num_rows * NUM_HEADS, mask=h_mask, other=float("-inf")) - lse_safe)
        part = tl.load(part_out + s * num_rows * NUM_HEADS * HEAD_DIM + offs, mask=mask, other=0.0)
        acc += w[:, None] * part
        total += w
    o = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out + offs, o.to(out.dtype.element_ty), mask=mask)


def attention_config(num_rows: int, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                     dtype: torch.dtype) -> dict:
    """The constexprs and launch options of the attention kernel for a batch of `num_rows` query rows
    (shared by the launcher and the compile test)."""
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_d = max(triton.next_power_of_2(head_dim), 16)       # compiled tl.dot needs every dimension >= 16
    block_q = max(1, 16 // block_g)                           # M = tile rows x GQA heads, at least 16
    tiles = num_rows * num_kv_heads                           # decode: one tile per row
    splits = min(MAX_SPLITS, max(1, TARGET_PROGRAMS // max(tiles, 1)))
    return dict(NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_Q=block_q,
                BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=64 if block_d <= 64 else 32, NUM_SPLITS=splits,
                NUM_STAGES=3, UPCAST=INTERPRETED and dtype == torch.bfloat16,  # the interpreter's tl.dot mishandles bf16
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=4)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_group: torch.Tensor, kv_lens: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]; GQA; softmax in float32. q and the caches share one dtype."""
    check_tensors("paged_attention", q, k_cache, v_cache, block_tables, query_group, kv_lens)
    t, h, d = q.shape
    _, page_size, hkv, d_cache = k_cache.shape
    if d_cache != d or h % hkv or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"paged_attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
                         f"{tuple(v_cache.shape)}: need [T, H, D], two equal [pages, block, Hkv, D], H % Hkv == 0")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"paged_attention: q {q.dtype} and caches {k_cache.dtype}/{v_cache.dtype} must share a dtype")
    if query_group.shape != (t,) or kv_lens.shape != (t,) or block_tables.dim() != 2:
        raise ValueError("paged_attention: query_group and kv_lens must be [T], block_tables [groups, pages]")
    if page_size & (page_size - 1):
        raise ValueError(f"paged_attention: the page size ({page_size}) must be a power of two")
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    config = attention_config(t, h, hkv, d, page_size, q.dtype)
    config["KV_ALIGN"] = 16 if all(stride % 16 == 0 for stride in k_cache.stride()[:3]) else 1
    splits = config["NUM_SPLITS"]
    if splits > 1:
        part_out = torch.empty((splits, t, h, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, t, h), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out
    _attention_kernel[(t, hkv, splits)](
        q, k_cache, v_cache, block_tables, query_group, kv_lens, out, part_out, part_lse, t, scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *block_tables.stride(), **config)
    if splits > 1:
        _combine_kernel[(t,)](part_out, part_lse, out, t, NUM_HEADS=h, HEAD_DIM=d, NUM_SPLITS=splits,
                              BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d), num_warps=4)
    return out
