"""Triton greedy tail of the LM head: per logits row, in one pass over the vocabulary, the argmax,
its log-probability (online max / sum of exponentials in float32) and whether the row has any
finite logit; the [B, V] logits are read once in their own dtype and never copied.

One program per row walks the row BLOCK_V columns at a time, each lane keeping its running
maximum, the first column reaching it and the sum of exp(x - maximum); the lanes are combined at
the end. Overflow is tamed as in the sampler (NaN -> -inf, +inf -> the largest float32).
Semantics and signature are those of kernels.reference.lm_head_tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import check_tensors

_FLOAT32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
_BLOCK_V = 2048


@triton.jit
def _lm_head_tail_kernel(logits, token_out, logprob_out, finite_out, vocab, stride_row, stride_col,
                         BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    row = logits + b * stride_row
    m = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    arg = tl.zeros([BLOCK_V], dtype=tl.int32)
    for start in tl.range(0, vocab, BLOCK_V):
        cols = start + offs
        x = tl.load(row + cols.to(tl.int64) * stride_col, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("-inf"), x)
        x = tl.where(x == float("inf"), _FLOAT32_MAX, x)
        bigger = x > m
        m_new = tl.where(bigger, x, m)
        # lanes still at -inf hold s = 0: exp of (-inf) - (-inf) must not turn it into NaN
        s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(x - m_new))
        arg = tl.where(bigger, cols, arg)
        m = m_new
    row_max = tl.max(m, axis=0)
    first = tl.min(tl.where(m == row_max, arg, vocab), axis=0)
    finite = row_max > float("-inf")
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - row_max)), axis=0)
    tl.store(token_out + b, tl.where(finite, first, 0).to(tl.int64))
    tl.store(logprob_out + b, tl.where(finite, -tl.log(total), float("nan")))
    tl.store(finite_out + b, finite)


def lm_head_tail(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (argmax int64 [B], log-probability of it float32 [B], finite bool [B])."""
    check_tensors("lm_head_tail", logits)
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"lm_head_tail: logits must be a float [B, V] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    b, vocab = logits.shape
    token = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprob = torch.empty(b, dtype=torch.float32, device=logits.device)
    finite = torch.empty(b, dtype=torch.bool, device=logits.device)
    if b > 0:
        _lm_head_tail_kernel[(b,)](logits, token, logprob, finite, vocab, *logits.stride(),
                                   BLOCK_V=min(triton.next_power_of_2(max(vocab, 1)), _BLOCK_V), num_warps=8)
    return token, logprob, finite
