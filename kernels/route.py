"""Triton phase ends: a layer stack's residual stream into the hidden-state pool, fused with the
router kinds' row updates, and the routers' per-token decisions.

`_stream_kernel` (one program per row) computes s = residual + x and, by the compile-time MODE,
writes the pool row: STORE (s, optionally also a copy row, and s / temp out: `scatter_stream`),
PLAIN (s; continue = depth < cap: `update_plain`), TOKEN (entry + score * s at the final recursion,
else s; continue = target > depth: `update_token`), EXPERT (h + alpha * act(score) * s, and the
new row / temp out: `update_expert`). Roundings follow kernels.reference op by op (each torch op
rounds to the row dtype). `_expert_decide_kernel` and `_token_decide_kernel` take the router GEMM's
scores, BLOCK_T rows per program. Semantics and signatures are those of kernels.reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import check_index, check_tensors
from kernels.norms import norm_warps

STORE, PLAIN, TOKEN, EXPERT = 0, 1, 2, 3
_ACTIVATIONS = {"sigmoid": 0, "tanh": 1}
_BLOCK_T = 64                 # rows per program of the decision kernels


@triton.jit
def _activation(raw, ACT: tl.constexpr):
    """sigmoid (ACT 0) or tanh (ACT 1) in float32."""
    if ACT == 0:
        return 1.0 / (1.0 + tl.exp(-raw))
    return 2.0 / (1.0 + tl.exp(-2.0 * raw)) - 1.0


@triton.jit
def _stream_kernel(x, residual, pool, index, copy, score, depth, target, cap, out, cont_out, d, alpha, temp,
                   stride_x_row, stride_res_row, stride_pool_row, stride_copy_row,
                   MODE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_COPY: tl.constexpr, HAS_OUT: tl.constexpr,
                   ACT: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = cols < d
    i = tl.load(index + t).to(tl.int64)
    dtype = pool.dtype.element_ty
    s = tl.load(x + t * stride_x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        s = (tl.load(residual + t * stride_res_row + cols, mask=mask, other=0.0).to(tl.float32)
             + s.to(tl.float32)).to(dtype)
    new = s
    if MODE == 2:                      # TOKEN
        dep = tl.load(depth + t)
        tgt = tl.load(target + t)
        w = tl.load(score + i).to(dtype).to(tl.float32)
        e = tl.load(copy + i * stride_copy_row + cols, mask=mask, other=0.0).to(tl.float32)
        gated = (e + (w * s.to(tl.float32)).to(dtype).to(tl.float32)).to(dtype)
        new = tl.where(tgt == dep, gated, s)
        tl.store(cont_out + t, tgt > dep)
    if MODE == 3:                      # EXPERT
        gate = (alpha * _activation(tl.load(score + i).to(tl.float32), ACT)).to(dtype).to(tl.float32)
        h = tl.load(pool + i * stride_pool_row + cols, mask=mask, other=0.0).to(tl.float32)
        new = (h + (gate * s.to(tl.float32)).to(dtype).to(tl.float32)).to(dtype)
    if MODE == 1:                      # PLAIN
        tl.store(cont_out + t, tl.load(depth + t) < tl.load(cap + i))
    tl.store(pool + i * stride_pool_row + cols, new, mask=mask)
    if HAS_COPY:
        if MODE == 0:
            tl.store(copy + i * stride_copy_row + cols, new, mask=mask)
    if HAS_OUT:
        tl.store(out + t * d + cols, tl.math.div_rn(new.to(tl.float32), temp).to(dtype), mask=mask)


@triton.jit
def _expert_decide_kernel(raw, depth, index, score, cap, threshold, bias, cont_out, num_rows, num_routers,
                          stride_raw_row, stride_raw_col, ACT: tl.constexpr, BLOCK_T: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = t < num_rows
    dep = tl.load(depth + t, mask=mask, other=0)
    i = tl.load(index + t, mask=mask, other=0).to(tl.int64)
    following = tl.minimum(dep, num_routers - 1).to(tl.int64)
    nxt = tl.load(raw + t * stride_raw_row + following * stride_raw_col, mask=mask, other=0.0).to(tl.float32)
    tl.store(score + i, nxt, mask=mask)
    takes = _activation(nxt + tl.load(bias + following, mask=mask, other=0.0), ACT) >= \
        tl.load(threshold + i, mask=mask, other=0.0)
    tl.store(cont_out + t, (dep < tl.load(cap + i, mask=mask, other=0)) & takes, mask=mask)


@triton.jit
def _token_decide_kernel(logits, index, score, cap, bias, depth_out, num_rows, num_routers, alpha,
                         stride_row, stride_col, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.arange(0, BLOCK_R)
    rows = t < num_rows
    valid = rows[:, None] & (r < num_routers)[None, :]
    x = tl.load(logits + t[:, None] * stride_row + r[None, :] * stride_col, mask=valid,
                other=float("-inf")).to(tl.float32)
    x = tl.where(rows[:, None], x, 0.0)                              # padding rows: finite, unused
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]
    i = tl.load(index + t, mask=rows, other=0).to(tl.int64)
    limit = tl.load(cap + i, mask=rows, other=1)
    scores = probs + tl.load(bias + r, mask=r < num_routers, other=0.0)[None, :]
    scores = tl.where(valid & ((r[None, :] + 1) <= limit[:, None]), scores, float("-inf"))
    best = tl.max(scores, axis=1)
    choice = tl.min(tl.where(scores == best[:, None], r[None, :], BLOCK_R), axis=1)    # the first maximum
    weight = alpha * tl.sum(tl.where(r[None, :] == choice[:, None], probs, 0.0), axis=1)
    tl.store(score + i, weight, mask=rows)
    tl.store(depth_out + t, (choice + 1).to(tl.int64), mask=rows)


def _stream(mode: int, pool: torch.Tensor, index: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
            copy: torch.Tensor | None = None, score: torch.Tensor | None = None, depth: torch.Tensor | None = None,
            target: torch.Tensor | None = None, cap: torch.Tensor | None = None, alpha: float = 1.0,
            router_func: str = "sigmoid", temp: float | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch _stream_kernel; returns (router input or None, continue or None)."""
    op = ("scatter_stream", "update_plain", "update_token", "update_expert")[mode]
    given = [t for t in (pool, index, x, residual, copy, score, depth, target, cap) if t is not None]
    check_tensors(op, *given)
    check_index(op, index)
    n, d = index.numel(), pool.shape[1]
    if x.shape != (n, d) or (residual is not None and residual.shape != x.shape) or pool.stride(1) != 1 \
            or x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError(f"{op}: x {tuple(x.shape)} / residual must be [T={n}, d={d}] with unit column strides "
                         f"like pool {tuple(pool.shape)}")
    out = torch.empty((n, d), dtype=pool.dtype, device=pool.device) if temp is not None else None
    cont = torch.empty(n, dtype=torch.bool, device=pool.device) if mode in (PLAIN, TOKEN) else None
    if n > 0:
        block_d = triton.next_power_of_2(d)
        dummy = pool
        _stream_kernel[(n,)](x, residual if residual is not None else x, pool, index,
                             copy if copy is not None else dummy, score if score is not None else dummy,
                             depth if depth is not None else index, target if target is not None else index,
                             cap if cap is not None else index, out if out is not None else dummy,
                             cont if cont is not None else index, d, alpha, 1.0 if temp is None else temp,
                             x.stride(0), (residual if residual is not None else x).stride(0), pool.stride(0),
                             (copy if copy is not None else pool).stride(0),
                             MODE=mode, HAS_RESIDUAL=residual is not None, HAS_COPY=copy is not None,
                             HAS_OUT=out is not None, ACT=_ACTIVATIONS[router_func], BLOCK_D=block_d,
                             num_warps=norm_warps(block_d))
    return out, cont


def scatter_stream(pool: torch.Tensor, index: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                   copy: torch.Tensor | None, temp: float | None) -> torch.Tensor | None:
    """pool[index] = residual + x (and copy[index]); returns (residual + x) / temp when temp is given."""
    return _stream(STORE, pool, index, x, residual, copy=copy, temp=temp)[0]


def update_plain(pool: torch.Tensor, index: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                 depth: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """pool[index] = residual + x; returns depth < cap[index]."""
    return _stream(PLAIN, pool, index, x, residual, depth=depth, cap=cap)[1]


def update_token(pool: torch.Tensor, index: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                 entry: torch.Tensor, score: torch.Tensor, depth: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pool[index] = entry + score * s at the final recursion, else s (s = residual + x); returns target > depth."""
    return _stream(TOKEN, pool, index, x, residual, copy=entry, score=score, depth=depth, target=target)[1]


def update_expert(pool: torch.Tensor, index: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                  score: torch.Tensor, alpha: float, router_func: str, temp: float) -> torch.Tensor:
    """pool[index] = h + alpha * act(score[index]) * (residual + x); returns the new rows / temp."""
    return _stream(EXPERT, pool, index, x, residual, score=score, alpha=alpha, router_func=router_func, temp=temp)[0]


def expert_decide(raw: torch.Tensor, depth: torch.Tensor, index: torch.Tensor, score: torch.Tensor,
                  cap: torch.Tensor, threshold: torch.Tensor, bias: torch.Tensor, router_func: str) -> torch.Tensor:
    """score[index] = the next router's score; returns depth < cap[index] and act(score + bias) >= threshold."""
    check_tensors("expert_decide", raw, depth, index, score, cap, threshold, bias)
    check_index("expert_decide", index)
    n = index.numel()
    cont = torch.empty(n, dtype=torch.bool, device=raw.device)
    if n > 0:
        _expert_decide_kernel[(triton.cdiv(n, _BLOCK_T),)](raw, depth, index, score, cap, threshold, bias, cont, n,
                                                           raw.shape[1], *raw.stride(), ACT=_ACTIVATIONS[router_func],
                                                           BLOCK_T=_BLOCK_T, num_warps=2)
    return cont


def token_decide(logits: torch.Tensor, index: torch.Tensor, score: torch.Tensor, cap: torch.Tensor,
                 bias: torch.Tensor, alpha: float) -> torch.Tensor:
    """depth = 1 + argmax over depths <= cap[index] of softmax(logits) + bias; score[index] = its gate."""
    check_tensors("token_decide", logits, index, score, cap, bias)
    check_index("token_decide", index)
    n = index.numel()
    depth = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n > 0:
        _token_decide_kernel[(triton.cdiv(n, _BLOCK_T),)](logits, index, score, cap, bias, depth, n, logits.shape[1],
                                                          alpha, *logits.stride(), BLOCK_T=_BLOCK_T,
                                                          BLOCK_R=triton.next_power_of_2(logits.shape[1]), num_warps=2)
    return depth
