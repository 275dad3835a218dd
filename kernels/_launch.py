"""Launch-side helpers shared by the Triton kernel modules: interpreter detection and input checks.

Triton 3.6 picks the interpreter when a function is decorated with `@triton.jit`, i.e. when the
kernel modules are imported, from the environment variable TRITON_INTERPRET. `INTERPRETED` records
that choice so the wrappers can adapt (the interpreter runs on CPU tensors and its `tl.dot` is only
reliable on float32 operands).
"""

from __future__ import annotations

import torch
import triton

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def check_tensors(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error unless the tensors can be handed to a Triton kernel in this process."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                         "before importing kernels.triton_ops to run them on CPU, or use kernels.reference")


def check_index(op: str, index: torch.Tensor) -> None:
    """Row indices must be a 1-D int32 or int64 tensor."""
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        raise ValueError(f"{op}: index must be a 1-D int32/int64 tensor, got {index.dtype} {tuple(index.shape)}")
