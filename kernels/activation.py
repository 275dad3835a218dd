"""Triton SwiGLU activation: silu(gate) * up over a fused gate|up projection [..., 2F] -> [..., F].

One program per (row, column block). Rounds like kernels.reference.silu_mul: silu in float32
rounded to the input dtype, then the product rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import check_tensors

_BLOCK_F = 1024  # columns per program (8 per thread with 4 warps)


@triton.jit
def _silu_mul_kernel(gate_up, out, f, stride_row, stride_col, BLOCK_F: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < f
    row = gate_up + t * stride_row
    gate = tl.load(row + cols * stride_col, mask=mask, other=0.0)
    up = tl.load(row + (cols + f) * stride_col, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out + t * f + cols, (silu * up.to(tl.float32)).to(out.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] (gate columns first) -> silu(gate) * up [..., F]."""
    check_tensors("silu_mul", gate_up)
    two_f = gate_up.shape[-1]
    if two_f % 2:
        raise ValueError(f"silu_mul: the last dimension ({two_f}) must be even (gate | up)")
    f = two_f // 2
    rows = gate_up.reshape(-1, two_f)
    out = torch.empty((*gate_up.shape[:-1], f), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] > 0 and f > 0:
        block_f = min(triton.next_power_of_2(f), _BLOCK_F)
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(f, block_f))](rows, out, f, *rows.stride(),
                                                                    BLOCK_F=block_f, num_warps=4)
    return out
