"""Kernels of the engine's hot path: row gather/scatter, RMSNorm (alone, after a residual add, after
a gather), SwiGLU's silu * up, paged KV store (optionally fused with RoPE), paged recursion-wise
attention, the phase ends (a layer stack's residual stream into the hidden-state pool, fused with
each router kind's row update) and the routers' decisions, the LM head's greedy tail (argmax,
its log-probability, finiteness), and the decode loop's row-state bookkeeping (loop_*: a
multi-step tick's masks, counts and records in three launches).

Three ways to call each op, all with one signature:
- `kernels.reference.<op>`: pure PyTorch, any device (the oracle of the tests);
- `kernels.triton_ops.<op>`: the Triton kernel, always (CUDA tensors, or TRITON_INTERPRET=1 on CPU);
- `kernels.<op>`: dispatch on the first tensor's device: Triton on CUDA, the reference elsewhere
  and whenever autograd records the call (the Triton kernels have no backward, and training runs
  the model's layers). kernels.triton_ops (and so triton) is imported only when a CUDA tensor
  first comes through.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, TypeVar

import torch

from kernels import reference

_Op = TypeVar("_Op", bound=Callable)


def _dispatching(ref_op: _Op) -> _Op:
    """ref_op's op, run by kernels.triton_ops when its first tensor argument is on CUDA and autograd
    does not record the call."""
    name = ref_op.__name__

    @functools.wraps(ref_op)
    def op(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if tensors[0].is_cuda and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return getattr(importlib.import_module("kernels.triton_ops"), name)(*args, **kwargs)
        return ref_op(*args, **kwargs)

    return op  # type: ignore[return-value]


gather_rows = _dispatching(reference.gather_rows)
scatter_rows = _dispatching(reference.scatter_rows)
gather_rows_rmsnorm = _dispatching(reference.gather_rows_rmsnorm)
rms_norm = _dispatching(reference.rms_norm)
add_rmsnorm = _dispatching(reference.add_rmsnorm)
silu_mul = _dispatching(reference.silu_mul)
lm_head_tail = _dispatching(reference.lm_head_tail)
store_kv = _dispatching(reference.store_kv)
store_kv_rope = _dispatching(reference.store_kv_rope)
paged_attention = _dispatching(reference.paged_attention)
scatter_stream = _dispatching(reference.scatter_stream)
update_plain = _dispatching(reference.update_plain)
update_token = _dispatching(reference.update_token)
update_expert = _dispatching(reference.update_expert)
expert_decide = _dispatching(reference.expert_decide)
token_decide = _dispatching(reference.token_decide)

loop_prologue_rows = _dispatching(reference.loop_prologue_rows)
loop_block_meta = _dispatching(reference.loop_block_meta)
loop_block_exit = _dispatching(reference.loop_block_exit)
loop_emit = _dispatching(reference.loop_emit)

__all__ = ["add_rmsnorm", "expert_decide", "gather_rows", "gather_rows_rmsnorm", "lm_head_tail", "paged_attention",
           "rms_norm", "scatter_rows", "scatter_stream", "silu_mul", "store_kv", "store_kv_rope", "token_decide",
           "update_expert", "update_plain", "update_token",
           "loop_block_exit", "loop_block_meta", "loop_emit", "loop_prologue_rows"]
