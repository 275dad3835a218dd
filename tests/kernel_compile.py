"""Ahead-of-time compile of every Triton kernel for one GPU target, without a GPU (helper of
tests/test_kernels_compile.py; run as a script in a process without TRITON_INTERPRET).

The launches to compile are the ones the launch wrappers really make: each wrapper of kernels.rows,
kernels.kv_store and kernels.attention is called on CPU tensors of the given shapes with its
kernels replaced by recorders (and the CUDA-tensor check waived), so the compiled signatures,
constexprs and num_warps are exactly the wrappers' choices. Each distinct launch is then compiled
with `triton.compile(ASTSource(...), target=GPUTarget(...))`. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import kernels.attention
import kernels.kv_store
import kernels.rows
from morserve.model.layers import rope_cos_sin

MODULES = (kernels.rows, kernels.kv_store, kernels.attention)
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
           torch.int32: "*i32", torch.int64: "*i64"}


def launched_kernels() -> dict[str, JITFunction]:
    """The kernels the wrappers launch (module-level JIT functions named *_kernel)."""
    return {f"{m.__name__}.{name}": fn for m in MODULES for name, fn in vars(m).items()
            if isinstance(fn, JITFunction) and name.endswith("_kernel")}


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument {value!r}")


class LaunchRecorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` records the launch, runs nothing."""

    def __init__(self, key: str, fn: JITFunction, launches: dict[str, dict[str, Any]]) -> None:
        self.key, self.fn, self.launches = key, fn, launches

    def __getitem__(self, grid: Any):
        return self.launch

    def launch(self, *args: Any, num_warps: int = 4, **kwargs: Any) -> None:
        constexprs = {name: kwargs[name] for name in self.fn.arg_names if name in kwargs}
        signature = {name: _arg_type(value) for name, value in zip(self.fn.arg_names, args)}
        signature.update({name: "constexpr" for name in constexprs})
        item = dict(kernel=self.key, signature=signature, constexprs=constexprs, num_warps=num_warps)
        self.launches[json.dumps(item, sort_keys=True)] = item


def record_launches(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """{kernel, signature, constexprs, num_warps} of every distinct launch the wrappers make for the
    cases ({dtype, hidden, heads, kv_heads, head_dim, page})."""
    launches: dict[str, dict[str, Any]] = {}
    for key, fn in launched_kernels().items():
        module_name, name = key.rsplit(".", 1)
        setattr(sys.modules[module_name], name, LaunchRecorder(key, fn, launches))
    for module in MODULES:
        module.check_tensors = lambda *_: None  # CPU tensors stand in for the CUDA ones
    for case in cases:
        dtype = getattr(torch, case["dtype"])
        hidden, h, hkv, d, page = (case[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "page"))
        t = 5  # query rows; index dtype int64 as the engine passes them
        pool = torch.zeros(8, hidden, dtype=dtype)
        index = torch.arange(t)
        kernels.rows.gather_rows(pool, index)
        kernels.rows.scatter_rows(pool, index, torch.zeros(t, hidden, dtype=dtype))
        kernels.rows.gather_rows_rmsnorm(pool, index, torch.ones(hidden, dtype=dtype), 1e-6)
        q, k, v = (torch.zeros(t, n, d, dtype=dtype) for n in (h, hkv, hkv))
        k_cache, v_cache = (torch.zeros(4, page, hkv, d, dtype=dtype) for _ in range(2))
        slots = torch.arange(t)
        kernels.kv_store.store_kv(k, v, k_cache, v_cache, slots)
        cos, sin = rope_cos_sin(torch.arange(t), d, 10000.0, dtype)
        kernels.kv_store.store_kv_rope(q, k, v, cos, sin, k_cache, v_cache, slots)
        tables = torch.zeros(1, 4, dtype=torch.int32)
        kernels.attention.paged_attention(q, k_cache, v_cache, tables, torch.zeros(t, dtype=torch.int32),
                                          torch.ones(t, dtype=torch.int32), d ** -0.5)
    return list(launches.values())


def compile_launch(launch: dict[str, Any], kernels_by_name: dict[str, JITFunction],
                   target: GPUTarget) -> dict[str, Any]:
    """Compile one recorded launch; its PTX target, kernel name and cubin size."""
    fn = kernels_by_name[launch["kernel"]]
    src = ASTSource(fn, launch["signature"], launch["constexprs"])
    compiled = triton.compile(src, target=target, options={"num_warps": launch["num_warps"]})
    return dict(launch, ptx_target=compiled.asm["ptx"].split(".target", 1)[1].split()[0],
                name=compiled.metadata.name, cubin_bytes=len(compiled.asm["cubin"]))


def main() -> None:
    spec = json.loads(sys.argv[1])
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("run without TRITON_INTERPRET: the interpreter replaces every @triton.jit function")
    target = GPUTarget("cuda", spec["capability"], 32)
    kernels_by_name = launched_kernels()
    launches = record_launches(spec["cases"])
    print(json.dumps(dict(triton=triton.__version__, kernels=sorted(kernels_by_name),
                          compiled=[compile_launch(launch, kernels_by_name, target) for launch in launches])))


if __name__ == "__main__":
    main()
