"""Triton RMSNorm, alone or fused with the residual add before it (one program per row).

`weighted_rms` is the row math shared with the gather + RMSNorm kernel of rows.py: the mean of
squares in float32, the normalised row rounded to the row dtype before the weight multiplies it,
as kernels.reference.rms_norm does. Semantics and signatures are those of kernels.reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import check_tensors


@triton.jit
def weighted_rms(x, weight, cols, mask, d, eps, stride_weight):
    """weight * rmsnorm(x) in float32 for one row x [BLOCK_D] of the row dtype (zeros past d)."""
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / d + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(weight + cols * stride_weight, mask=mask, other=0.0).to(tl.float32)
    return w * normed


@triton.jit
def _add_rmsnorm_kernel(x, residual, weight, normed_out, residual_out, d, eps,
                        stride_x_row, stride_x_col, stride_res_row, stride_res_col, stride_weight,
                        HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    """normed_out[t] = weight * rmsnorm(s), s = residual[t] + x[t] (stored to residual_out[t])
    or s = x[t] without HAS_RESIDUAL."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = cols < d
    row = tl.load(x + t * stride_x_row + cols * stride_x_col, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual + t * stride_res_row + cols * stride_res_col, mask=mask, other=0.0)
        row = (res.to(tl.float32) + row.to(tl.float32)).to(residual_out.dtype.element_ty)
        tl.store(residual_out + t * d + cols, row, mask=mask)
    normed = weighted_rms(row, weight, cols, mask, d, eps, stride_weight)
    tl.store(normed_out + t * d + cols, normed.to(normed_out.dtype.element_ty), mask=mask)


def norm_warps(block_d: int) -> int:
    """Warps of a one-row-per-program kernel over BLOCK_D columns (8 elements per thread and up)."""
    return min(max(block_d // 256, 1), 16)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    op = "rms_norm" if residual is None else "add_rmsnorm"
    check_tensors(op, x, weight, *(() if residual is None else (residual,)))
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"{op}: weight {tuple(weight.shape)} must be [{d}] for x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{op}: residual {residual.dtype} {tuple(residual.shape)} must match x "
                         f"{x.dtype} {tuple(x.shape)}")
    rows = x.reshape(-1, d)
    res_rows = rows if residual is None else residual.reshape(-1, d)
    normed = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else normed
    if rows.shape[0] > 0:
        block_d = triton.next_power_of_2(d)
        _add_rmsnorm_kernel[(rows.shape[0],)](rows, res_rows, weight, normed, new_residual, d, eps,
                                              *rows.stride(), *res_rows.stride(), weight.stride(0),
                                              HAS_RESIDUAL=residual is not None, BLOCK_D=block_d,
                                              num_warps=norm_warps(block_d))
    return normed, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) over the last dimension (the promoted dtype of weight and x)."""
    return _launch(x, None, weight, eps)[0]


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = residual + x; returns (rms_norm(new_residual, weight, eps), new_residual)."""
    return _launch(x, residual, weight, eps)
