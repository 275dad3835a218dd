"""Launch-side helpers shared by the Triton kernel modules: interpreter detection and input checks.

Triton 3.6 picks the interpreter when a function is decorated with `@triton.jit`, i.e. when the
kernel modules are imported, from the environment variable TRITON_INTERPRET. `INTERPRETED` records
that choice so the wrappers can adapt (the interpreter runs on CPU tensors and its `tl.dot` is only
reliable on float32 operands). Triton < 3.7's interpreter turns loaded scalars into Python ints
through 1-element numpy arrays, which numpy >= 2.4 refuses: that pair is rejected at import.
"""

from __future__ import annotations

import numpy
import torch
import triton

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


if INTERPRETED and _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
    raise ImportError(f"the Triton {triton.__version__} interpreter needs numpy < 2.4 (numpy {numpy.__version__} "
                      "refuses its scalar conversions; fixed in triton 3.7): install 'numpy<2.4' or triton >= 3.7")


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
