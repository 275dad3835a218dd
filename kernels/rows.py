"""Triton row movement between the persistent hidden-state pool [N, d] and a tick's batch [T, d].

`gather_rows` / `scatter_rows` share one copy kernel (which side is indexed is a compile-time flag);
`gather_rows_rmsnorm` fuses the gather with the RMSNorm that follows it. Semantics and signatures
are those of kernels.reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import check_index, check_tensors
from kernels.norms import weighted_rms, norm_warps

_MAX_COPY_BLOCK = 2048  # elements per program of the copy kernel (16 B per thread and access at bf16)


@triton.jit
def _copy_rows_kernel(src, dst, index, d, stride_src_row, stride_src_col, stride_dst_row, stride_dst_col,
                      INDEXED_SRC: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[t] = src[index[t]] (INDEXED_SRC) or dst[index[t]] = src[t]; one program per (t, column block)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    i = tl.load(index + t).to(tl.int64)
    src_row = i if INDEXED_SRC else t
    dst_row = t if INDEXED_SRC else i
    x = tl.load(src + src_row * stride_src_row + cols * stride_src_col, mask=mask)
    tl.store(dst + dst_row * stride_dst_row + cols * stride_dst_col,
             x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _gather_rmsnorm_kernel(pool, index, weight, rows_out, normed_out, d, eps,
                           stride_pool_row, stride_pool_col, stride_weight, BLOCK_D: tl.constexpr):
    """rows_out[t] = pool[index[t]]; normed_out[t] = weight * rmsnorm(rows_out[t]); one program per row."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = cols < d
    i = tl.load(index + t).to(tl.int64)
    x = tl.load(pool + i * stride_pool_row + cols * stride_pool_col, mask=mask, other=0.0)
    tl.store(rows_out + t * d + cols, x, mask=mask)
    normed = weighted_rms(x, weight, cols, mask, d, eps, stride_weight)
    tl.store(normed_out + t * d + cols, normed.to(normed_out.dtype.element_ty), mask=mask)


def _copy_rows(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, indexed_src: bool) -> None:
    t, d = index.numel(), src.shape[1]
    if t == 0:
        return
    block_d = min(triton.next_power_of_2(d), _MAX_COPY_BLOCK)
    grid = (t, triton.cdiv(d, block_d))
    _copy_rows_kernel[grid](src, dst, index, d, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
                            INDEXED_SRC=indexed_src, BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8)


def gather_rows(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """pool [N, d], index [T] (int32/int64) -> pool[index] as a new contiguous [T, d]."""
    check_tensors("gather_rows", pool, index)
    check_index("gather_rows", index)
    out = torch.empty((index.numel(), pool.shape[1]), dtype=pool.dtype, device=pool.device)
    _copy_rows(pool, out, index, indexed_src=True)
    return out


def scatter_rows(pool: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """pool[index] = rows, in place (indices are distinct); rows are cast to the pool's dtype."""
    check_tensors("scatter_rows", pool, index, rows)
    check_index("scatter_rows", index)
    if rows.shape != (index.numel(), pool.shape[1]):
        raise ValueError(f"scatter_rows: rows {tuple(rows.shape)} do not match index {index.numel()} "
                         f"x pool width {pool.shape[1]}")
    _copy_rows(rows, pool, index, indexed_src=False)


def gather_rows_rmsnorm(pool: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather fused with the RMSNorm that follows: returns (rows, rmsnorm(rows) * weight)."""
    check_tensors("gather_rows_rmsnorm", pool, index, weight)
    check_index("gather_rows_rmsnorm", index)
    t, d = index.numel(), pool.shape[1]
    rows = torch.empty((t, d), dtype=pool.dtype, device=pool.device)
    normed = torch.empty((t, d), dtype=torch.promote_types(weight.dtype, pool.dtype), device=pool.device)
    if t > 0:
        block_d = triton.next_power_of_2(d)
        _gather_rmsnorm_kernel[(t,)](pool, index, weight, rows, normed, d, eps,
                                     pool.stride(0), pool.stride(1), weight.stride(0),
                                     BLOCK_D=block_d, num_warps=norm_warps(block_d))
    return rows, normed
