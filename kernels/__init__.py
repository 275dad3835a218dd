"""Kernels of the engine's hot path: row gather/scatter, paged KV store (optionally fused with RoPE),
paged recursion-wise attention.

Three ways to call each op, all with one signature:
- `kernels.reference.<op>`: pure PyTorch, any device (the oracle of the tests);
- `kernels.triton_ops.<op>`: the Triton kernel, always (CUDA tensors, or TRITON_INTERPRET=1 on CPU);
- `kernels.<op>`: dispatch on the first tensor's device: Triton on CUDA, the reference elsewhere.
  kernels.triton_ops (and so triton) is imported only when a CUDA tensor first comes through.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, TypeVar

import torch

from kernels import reference

_Op = TypeVar("_Op", bound=Callable)


def _dispatching(ref_op: _Op) -> _Op:
    """ref_op's op, run by kernels.triton_ops when its first tensor argument is on CUDA."""
    name = ref_op.__name__

    @functools.wraps(ref_op)
    def op(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if first.is_cuda:
            return getattr(importlib.import_module("kernels.triton_ops"), name)(*args, **kwargs)
        return ref_op(*args, **kwargs)

    return op  # type: ignore[return-value]


gather_rows = _dispatching(reference.gather_rows)
scatter_rows = _dispatching(reference.scatter_rows)
gather_rows_rmsnorm = _dispatching(reference.gather_rows_rmsnorm)
store_kv = _dispatching(reference.store_kv)
store_kv_rope = _dispatching(reference.store_kv_rope)
paged_attention = _dispatching(reference.paged_attention)

__all__ = ["gather_rows", "gather_rows_rmsnorm", "paged_attention", "scatter_rows", "store_kv", "store_kv_rope"]
