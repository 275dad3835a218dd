"""Ahead-of-time compile of every Triton kernel of this package for sm_90 (H100/H200), on any
machine: `python -m kernels.aot [--json]` prints one line per launch variant (registers, spill
bytes, shared memory) and exits non-zero if a variant fails to compile or spills registers.

The launch arguments are not written by hand: each kernel wrapper (kernels.triton_ops) is called
on CPU tensors shaped like the engine's batches (the 360M MoR/vanilla models and SmolLM2-135M; a
decode batch of 16 rows and a 512-token prefill chunk; bfloat16, float16 and float32) with
its Triton kernels replaced by recorders. Each distinct recorded launch becomes
`triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))`
with the launch's num_warps / num_stages, the signature typed and specialised as the JIT does (an
int argument equal to 1 is a constant; 16-divisible pointers and ints carry the divisibility hint).
ptxas (shipped with Triton) is then run with -v on the PTX for the register and spill counts.
Needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled). Uses only ASTSource,
GPUTarget, triton.compile and the compiled kernel's `asm` / `metadata.shared`, which triton 3.6
and 3.7 share.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, KernelInterface

import kernels.activation
import kernels.attention
import kernels.kv_store
import kernels.lm_tail
import kernels.loop_state
import kernels.norms
import kernels.route
import kernels.rows
import kernels.triton_ops as tri
from kernels._launch import INTERPRETED
from morserve.model.layers import rope_cos_sin

TARGET = GPUTarget("cuda", 90, 32)
MODULES = (kernels.activation, kernels.attention, kernels.kv_store, kernels.lm_tail, kernels.loop_state,
           kernels.norms, kernels.route, kernels.rows)
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int64: "i64", torch.bool: "i1"}
# (name, hidden, intermediate, heads, kv heads, head dim, vocab): the shapes the engine serves
SHAPES = [("360M", 960, 2560, 15, 5, 64, 49152), ("135M", 576, 1536, 9, 3, 64, 49152)]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PAGE_SIZE = 16                 # EngineArgs.block_size's default
ROWS = (16, 512)               # a decode batch (split-KV on), a prefill chunk (split-KV off)


def kernel_functions() -> dict[str, KernelInterface]:
    """Every @triton.jit kernel (name ending in _kernel) of the package's modules: JITFunctions, or
    InterpretedFunctions in a process where TRITON_INTERPRET=1 bound them to the interpreter (as
    in the test process once tests/test_kernels.py ran; compiling needs a process without it)."""
    return {name: obj for module in MODULES for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and name.endswith("_kernel")}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, fn: JITFunction, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def _engine_calls(shape: tuple, dtype: torch.dtype, rows: int) -> None:
    """One layer's worth of kernel wrapper calls on engine-shaped CPU tensors (q/k/v as views of
    one fused projection; int64 pool indices, positions, groups, entries and lengths, as the engine's
    metadata rows; int32 block tables, one layer column of a [groups, pages, layers] table)."""
    _, d, f, h, hkv, hd, vocab = shape
    pool = torch.zeros(rows + 8, d, dtype=dtype)
    index = torch.arange(rows, dtype=torch.int64)
    weight = torch.ones(d, dtype=dtype)
    x = tri.gather_rows(pool, index)
    tri.scatter_rows(pool, index, x)
    tri.gather_rows_rmsnorm(pool, index, weight, 1e-5)
    tri.rms_norm(x, weight, 1e-5)
    tri.add_rmsnorm(x, x.clone(), weight, 1e-5)
    tri.silu_mul(torch.zeros(rows, 2 * f, dtype=dtype))
    tri.lm_head_tail(torch.zeros(min(rows, 256), vocab, dtype=dtype))
    qkv = torch.zeros(rows, (h + 2 * hkv) * hd, dtype=dtype)
    q, k, v = (part.unflatten(-1, (-1, hd)) for part in qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1))
    cos, sin = rope_cos_sin(torch.arange(rows + 8), hd, 10000.0, dtype)
    pages = -(-rows // PAGE_SIZE) + 1
    k_cache = torch.zeros(pages, PAGE_SIZE, hkv, hd, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    positions = torch.arange(rows, dtype=torch.int64)
    groups, entries = torch.zeros(rows, dtype=torch.int64), torch.arange(rows, dtype=torch.int64)
    tables = torch.zeros(rows, pages, 2, dtype=torch.int32)[:, :, 1]
    tri.store_kv(k, v, k_cache, v_cache, tables, groups, entries)
    q_roped = tri.store_kv_rope(q, k, v, cos, sin, positions, k_cache, v_cache, tables, groups, entries)
    tri.paged_attention(q_roped, k_cache, v_cache, tables, groups, positions + 1, hd ** -0.5)
    # phase ends and routing (4 expert routers / a 4-way token router), pool-indexed state
    score, cap = torch.zeros(rows + 8, dtype=torch.float32), torch.full((rows + 8,), 4, dtype=torch.int64)
    threshold, bias, depth = torch.zeros(rows + 8, dtype=torch.float32), torch.zeros(4), torch.ones_like(index)
    for copy, temp in ((None, None), (pool.clone(), 1.0)):
        tri.scatter_stream(pool, index, x, x.clone(), copy, temp)
    tri.scatter_stream(pool, index, x, None, None, 1.0)
    tri.update_plain(pool, index, x, x.clone(), depth, cap)
    tri.update_token(pool, index, x, x.clone(), pool.clone(), score, depth, depth)
    for router_func in ("sigmoid", "tanh"):
        tri.update_expert(pool, index, x, x.clone(), score, 0.1, router_func, 1.0)
        tri.expert_decide(torch.zeros(rows, 4, dtype=dtype), depth, index, score, cap, threshold, bias, router_func)
    tri.token_decide(torch.zeros(rows, 4, dtype=dtype), index, score, cap, bias, 0.1)
    _loop_state_calls(rows)


def _loop_state_calls(rows: int, steps: int = 8) -> None:
    """The decode loop's bookkeeping over `rows` state rows (kernels/loop_state.py), for both
    cache-stage rules, both kinds of block pass (a tick's first, with the prologue's rows) and
    vanilla (Nr = 1, specialised as a constant) or MoR (Nr = 4) models."""
    long = dict(dtype=torch.long)
    live, cont = torch.ones(rows, dtype=torch.bool), torch.ones(rows, dtype=torch.bool)
    depth, slot, position, target = (torch.zeros(rows, **long) for _ in range(4))
    entering = (torch.zeros(rows, **long), torch.zeros(rows, **long), torch.zeros(rows, **long))
    prologue, step = torch.zeros(steps, **long), torch.zeros(1, **long)
    tri.loop_prologue_rows(live, depth, slot, position, rows, *entering)
    for num_recursions in (1, 4):
        occupancy, exits = torch.zeros(steps, num_recursions, **long), torch.zeros(steps, num_recursions, **long)
        for share_first in (False, True):
            lengths = torch.zeros(rows, 2 if share_first else num_recursions + 1, **long)
            for enter in (True, False):
                tri.loop_block_meta(live, depth, slot, position, target, lengths, target, prologue, occupancy,
                                    exits, step, rows, num_recursions, share_first, enter=enter)
        tri.loop_block_exit(live, depth, cont, slot, position, exits, step, num_recursions, rows)
    tri.loop_emit(live, depth, slot, position, target, target, torch.zeros(rows), cont,
                  torch.zeros(steps, rows, **long), torch.zeros(steps, rows, **long), torch.zeros(steps, rows), step,
                  rows, *entering)


def _arg_type(value) -> tuple[str, object | None, bool]:
    """(signature type, constant value if the JIT specialises it, 16-divisible)."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype], None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"no Triton type for {type(value)}")


def _variant(fn: JITFunction, args: tuple, kwargs: dict) -> tuple:
    """A hashable launch: (kernel name, signature, constexprs, 16-divisible arg indices, options)."""
    names = fn.arg_names
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
    signature, constexprs, divisible = [], [], []
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature.append((param.name, "constexpr"))
            constexprs.append((param.name, value))
            continue
        kind, constant, aligned = _arg_type(value)
        signature.append((param.name, kind))
        if constant is not None:
            constexprs.append((param.name, constant))
        elif aligned:
            divisible.append(i)
    return fn.__name__, tuple(signature), tuple(constexprs), tuple(divisible), options


def launch_variants() -> list[tuple]:
    """The distinct launches of the engine-shaped wrapper calls, in first-seen order."""
    calls: list = []
    saved = []
    try:
        for module in MODULES:
            for name, obj in list(vars(module).items()):
                if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                    saved.append((module, name, obj))
                    setattr(module, name, _Recorder(obj, calls))
            if hasattr(module, "check_tensors"):
                saved.append((module, "check_tensors", module.check_tensors))
                module.check_tensors = lambda *args: None
        for shape in SHAPES:
            for dtype in DTYPES:
                for rows in ROWS:
                    _engine_calls(shape, dtype, rows)
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)
    return list(dict.fromkeys(_variant(fn, args, kwargs) for fn, args, kwargs in calls))


def _ptxas() -> str:
    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    path = getattr(getattr(nvidia, "ptxas", None), "path", None)
    return path or str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def compile_variant(variant: tuple) -> dict:
    """Compile one launch for sm_90: registers, spill bytes (stores, loads), shared memory bytes."""
    name, signature, constexprs, divisible, options = variant
    source = ASTSource(kernel_functions()[name], dict(signature), constexprs=dict(constexprs),
                       attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    compiled = triton.compile(source, target=TARGET, options=dict(options))
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        log = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", str(path), "-o", str(path.with_suffix(".o"))],
                             check=True, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(regs=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                shared=int(compiled.metadata.shared))


def _row(variant: tuple) -> dict:
    """describe(variant) plus its compile figures, or the error that stopped the compile."""
    row = describe(variant)
    try:
        row |= compile_variant(variant)
    except Exception as error:          # reported per variant; the exit status says it failed
        row["error"] = f"{type(error).__name__}: {error}"[:2000]
    return row


def describe(variant: tuple) -> dict:
    """Kernel, data dtypes and the upper-case constexprs / options of a launch, for the table."""
    name, signature, constexprs, _, options = variant
    floats = sorted({kind[1:] for _, kind in signature if kind in ("*fp32", "*fp16", "*bf16")})
    consts = " ".join(f"{k}={v}" for k, v in constexprs if k.isupper() and k not in ("UPCAST",))
    return dict(kernel=name, dtypes="/".join(floats), config=" ".join([consts] + [f"{k}={v}" for k, v in options]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per variant instead of a table")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    args = parser.parse_args()
    if INTERPRETED:
        print("kernels.aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    variants = launch_variants()
    missing = set(kernel_functions()) - {variant[0] for variant in variants}
    if missing:
        print(f"kernels.aot: no engine-shaped call launches {sorted(missing)}", file=sys.stderr)
        return 1
    failed = 0
    if not args.json:
        print(f"{'kernel':<22} {'dtypes':<10} {'regs':>4} {'spills':>7} {'shared':>7}  config")
    with concurrent.futures.ProcessPoolExecutor(max(args.jobs, 1)) as pool:
        rows = list(pool.map(_row, variants))
    for row in rows:
        failed += "error" in row or row.get("spill_stores", 0) > 0 or row.get("spill_loads", 0) > 0
        if args.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"{row['kernel']:<22} {row['dtypes']:<10} FAILED {row['error']}  {row['config']}", flush=True)
        else:
            spills = f"{row['spill_stores']}/{row['spill_loads']}"
            print(f"{row['kernel']:<22} {row['dtypes']:<10} {row['regs']:>4} {spills:>7} {row['shared']:>7}  "
                  f"{row['config']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
