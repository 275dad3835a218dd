"""Triton paged recursion-wise attention over a whole mixed batch in one launch.

Every query row t carries its own group (query_group[t] -> a block-table row, i.e. one sequence at
one recursion depth) and its own visible length kv_lens[t]; decode rows and causally masked
prefill-chunk rows are therefore the same thing to the kernel. One program per (query row, KV head)
covers the GQA head group as the M dimension of its dot products (padded to 16), walks the row's
visible entries BLOCK_N at a time (each key looked up through the block table, so any page size
works) and keeps an online softmax in float32. Offsets are widened to int64 before any stride
multiply. Semantics and signature are those of kernels.reference.paged_attention.

Decode-oriented: prefill-chunk rows each re-read their group's K/V (from L2 in practice). A query-
tiled path for long chunks and a split-KV pass for few very long sequences are not implemented.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import INTERPRETED, check_tensors

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(q, k_cache, v_cache, block_tables, query_group, kv_lens, out, qk_scale,
                            stride_qt, stride_qh, stride_qd,
                            stride_cache_page, stride_cache_off, stride_cache_h, stride_cache_d,
                            stride_table_row, stride_table_col,
                            NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                            PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    group = tl.load(query_group + t).to(tl.int64)
    n_kv = tl.load(kv_lens + t)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_g < GROUP)[:, None] & d_mask[None, :]
    q_tile = tl.load(q + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                     mask=q_mask, other=0.0)
    if UPCAST:
        q_tile = q_tile.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables + group * stride_table_row
    for start in range(0, n_kv, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < n_kv
        page = tl.load(table + (pos // PAGE_SIZE) * stride_table_col, mask=n_mask, other=0).to(tl.int64)
        row_offs = page * stride_cache_page + (pos % PAGE_SIZE) * stride_cache_off + kv_head * stride_cache_h
        kv_offs = row_offs[:, None] + offs_d[None, :] * stride_cache_d
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_tile = tl.load(k_cache + kv_offs, mask=kv_mask, other=0.0)
        v_tile = tl.load(v_cache + kv_offs, mask=kv_mask, other=0.0)
        if UPCAST:
            k_tile = k_tile.to(tl.float32)
            v_tile = v_tile.to(tl.float32)
        s = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * qk_scale  # log2 domain
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every visited block has a visible key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that see nothing give zeros
    tl.store(out + t * NUM_HEADS * HEAD_DIM + heads[:, None] * HEAD_DIM + offs_d[None, :],
             o.to(out.dtype.element_ty), mask=q_mask)


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
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    group = h // hkv
    block_d = max(triton.next_power_of_2(d), 16)  # compiled tl.dot needs every dimension >= 16
    _paged_attention_kernel[(t, hkv)](
        q, k_cache, v_cache, block_tables, query_group, kv_lens, out, scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *block_tables.stride(),
        NUM_HEADS=h, GROUP=group, HEAD_DIM=d, PAGE_SIZE=page_size,
        BLOCK_G=max(triton.next_power_of_2(group), 16), BLOCK_D=block_d, BLOCK_N=64 if block_d <= 128 else 32,
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,  # the interpreter's tl.dot mishandles bf16
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4)
    return out
