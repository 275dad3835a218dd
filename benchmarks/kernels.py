"""GPU benchmark of the Triton kernels (kernels.triton_ops) against plain-PyTorch baselines.

Questions answered, as one markdown table:
- gather / scatter / fused gather+RMSNorm: achieved bandwidth vs a contiguous device copy of the
  same bytes (the ceiling) and vs the torch reference (index_select / index_copy_);
- decode paged attention at long contexts over many sequences: effective bandwidth (K/V bytes read)
  vs dense SDPA on contiguous K/V of the same size, plus one mixed batch (a 512-token prefill chunk
  beside decode rows, its rows sharing query tiles) to show what prefill rows cost;
- the layer's fused kernels (residual add + RMSNorm, silu * up) and the LM-head tail (argmax,
  log-probability, finiteness in one pass over bf16/fp16 logits) vs their torch references.

    python benchmarks/kernels.py --check        # the kernel test suite + per-case checks, then timings
Needs a CUDA GPU (and imports without one, for --help).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _HERE:  # this file would shadow the kernels package
    sys.path[0] = str(_HERE.parent)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

import kernels.reference as ref  # noqa: E402
import kernels.triton_ops as tri  # noqa: E402

# (query heads, KV heads, head dim) of the attention shapes benchmarked.
MODELS = {"smollm2-135m": (9, 3, 64), "llama-8b": (32, 8, 128)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Row:
    kernel: str
    shape: str
    nbytes: int  # bytes a perfect kernel moves
    ms: float
    baseline: str
    baseline_ms: float

    def markdown(self) -> str:
        def gbps(ms: float) -> float:
            return self.nbytes / ms / 1e6

        return (f"| {self.kernel} | {self.shape} | {self.ms * 1e3:.1f} | {gbps(self.ms):.0f} | {self.baseline} "
                f"| {self.baseline_ms * 1e3:.1f} | {gbps(self.baseline_ms):.0f} |")


HEADER = ("| kernel | shape | triton us | triton GB/s | baseline | baseline us | baseline GB/s |\n"
          "|---|---|---:|---:|---|---:|---:|")


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on the current CUDA stream."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def check(name: str, got: object, expected: object, dtype: torch.dtype) -> None:
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def row_cases(args: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    pool = torch.randn(args.pool_rows, args.hidden, device="cuda", dtype=dtype)
    weight = torch.randn(args.hidden, device="cuda", dtype=dtype)
    rows_out = []
    for t in args.rows:
        index = torch.randperm(args.pool_rows, device="cuda")[:t].to(torch.int32)
        batch = torch.randn(t, args.hidden, device="cuda", dtype=dtype)
        dense_src, dense_dst = pool[:t].clone(), torch.empty_like(batch)
        copy_ms = bench(lambda: dense_dst.copy_(dense_src))
        moved = 2 * t * args.hidden * pool.element_size()
        shape = f"T={t} d={args.hidden} pool={args.pool_rows}"
        if args.check:
            check("gather_rows", tri.gather_rows(pool, index), ref.gather_rows(pool, index), dtype)
            check("gather_rows_rmsnorm", tri.gather_rows_rmsnorm(pool, index, weight, 1e-6),
                  ref.gather_rows_rmsnorm(pool, index, weight, 1e-6), dtype)
            expected = pool.clone()
            ref.scatter_rows(expected, index, batch)
            tri.scatter_rows(pool, index, batch)
            check("scatter_rows", pool, expected, dtype)
        gather_ms = bench(lambda: tri.gather_rows(pool, index))
        rows_out += [
            Row("gather_rows", shape, moved, gather_ms, "device copy", copy_ms),
            Row("gather_rows", shape, moved, gather_ms, "index_select", bench(lambda: ref.gather_rows(pool, index))),
            Row("scatter_rows", shape, moved, bench(lambda: tri.scatter_rows(pool, index, batch)), "index_copy_",
                bench(lambda: ref.scatter_rows(pool, index, batch))),
            Row("gather_rows_rmsnorm", shape, moved * 3 // 2,
                bench(lambda: tri.gather_rows_rmsnorm(pool, index, weight, 1e-6)), "torch gather+rmsnorm",
                bench(lambda: ref.gather_rows_rmsnorm(pool, index, weight, 1e-6))),
        ]
    return rows_out + fused_cases(args, dtype)


def fused_cases(args: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    """The layer's fused row kernels (residual add + RMSNorm, silu * up) and the LM-head tail,
    against their torch references (several aten kernels each)."""
    out = []
    weight = torch.randn(args.hidden, device="cuda", dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    for t in args.rows:
        x, residual = (torch.randn(t, args.hidden, device="cuda", dtype=dtype) for _ in range(2))
        gate_up = torch.randn(t, 2 * args.intermediate, device="cuda", dtype=dtype)
        logits = torch.randn(min(t, 256), args.vocab, device="cuda", dtype=dtype)
        if args.check:
            check("add_rmsnorm", tri.add_rmsnorm(x, residual, weight, 1e-6), ref.add_rmsnorm(x, residual, weight, 1e-6),
                  dtype)
            check("silu_mul", tri.silu_mul(gate_up), ref.silu_mul(gate_up), dtype)
            for got, expected in zip(tri.lm_head_tail(logits), ref.lm_head_tail(logits)):
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        out += [
            Row("add_rmsnorm", f"T={t} d={args.hidden}", 4 * t * args.hidden * size,
                bench(lambda: tri.add_rmsnorm(x, residual, weight, 1e-6)), "torch add + rmsnorm",
                bench(lambda: ref.add_rmsnorm(x, residual, weight, 1e-6))),
            Row("silu_mul", f"T={t} F={args.intermediate}", 3 * t * args.intermediate * size,
                bench(lambda: tri.silu_mul(gate_up)), "torch silu * up", bench(lambda: ref.silu_mul(gate_up))),
            Row("lm_head_tail", f"B={logits.shape[0]} V={args.vocab}", logits.numel() * size,
                bench(lambda: tri.lm_head_tail(logits)), "torch float32 argmax + log_softmax",
                bench(lambda: ref.lm_head_tail(logits))),
        ]
    return out


def _paged(seqs: int, context: int, heads: tuple[int, int, int], page_size: int, dtype: torch.dtype):
    """Caches holding `seqs` sequences of `context` entries on shuffled pages, plus their block table."""
    _, hkv, d = heads
    pages_per_seq = triton.cdiv(context, page_size)
    num_pages = seqs * pages_per_seq
    k_cache = torch.randn(num_pages, page_size, hkv, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_pages, device="cuda").view(seqs, pages_per_seq).to(torch.int32)
    return k_cache, v_cache, block_tables


def dense_sdpa_ms(q: torch.Tensor, hkv: int, context: int) -> float:
    """The dense baseline over the same bytes: contiguous K/V, one query per sequence (freed after)."""
    seqs, _, d = q.shape
    k_dense = torch.randn(seqs, hkv, context, d, device=q.device, dtype=q.dtype)
    v_dense = torch.randn_like(k_dense)
    q_dense = q.unsqueeze(2)
    return bench(lambda: F.scaled_dot_product_attention(q_dense, k_dense, v_dense, enable_gqa=True))


def attention_cases(args: argparse.Namespace, dtype: torch.dtype) -> list[Row]:
    out = []
    for model in args.models:
        h, hkv, d = MODELS[model]
        for context in args.contexts:
            for seqs in args.seqs:
                k_cache, v_cache, block_tables = _paged(seqs, context, MODELS[model], args.page_size, dtype)
                kv_bytes = 2 * seqs * context * hkv * d * k_cache.element_size()
                shape = f"{model} B={seqs} ctx={context} page={args.page_size}"
                q = torch.randn(seqs, h, d, device="cuda", dtype=dtype)
                decode = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                              query_group=torch.arange(seqs, device="cuda", dtype=torch.int32),
                              kv_lens=torch.full((seqs,), context, device="cuda", dtype=torch.int32), scale=d ** -0.5)
                sdpa_ms = dense_sdpa_ms(q, hkv, context)
                # Mixed batch: sequence 0 prefills its last `chunk` entries, the others decode.
                chunk = min(512, context)
                mixed = dict(decode, q=torch.randn(seqs - 1 + chunk, h, d, device="cuda", dtype=dtype),
                             query_group=torch.cat([torch.zeros(chunk, dtype=torch.int32, device="cuda"),
                                                    decode["query_group"][1:]]),
                             kv_lens=torch.cat([torch.arange(context - chunk + 1, context + 1, device="cuda",
                                                             dtype=torch.int32), decode["kv_lens"][1:]]))
                if args.check:
                    for name, batch in (("decode", decode), ("mixed", mixed)):
                        check(f"paged_attention {name} {shape}", tri.paged_attention(**batch),
                              ref.paged_attention(**batch), dtype)
                out += [
                    Row("paged_attention decode", shape, kv_bytes, bench(lambda: tri.paged_attention(**decode)),
                        "dense SDPA (contiguous K/V)", sdpa_ms),
                    Row(f"paged_attention decode + {chunk}-token chunk", shape, kv_bytes,
                        bench(lambda: tri.paged_attention(**mixed)), "decode only",
                        bench(lambda: tri.paged_attention(**decode))),
                ]
                del k_cache, v_cache
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="run tests/test_kernels.py on the GPU first, and compare every benchmarked case with "
                        "the torch reference before timing it")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size of the gather/scatter rows")
    p.add_argument("--intermediate", type=int, default=2560, help="MLP width of the silu * up rows")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary of the LM-head tail rows")
    p.add_argument("--pool-rows", type=int, default=65536, help="rows of the persistent hidden-state pool")
    p.add_argument("--rows", type=int, nargs="+", default=[256, 4096, 16384], help="rows gathered per tick")
    p.add_argument("--models", choices=sorted(MODELS), nargs="+", default=sorted(MODELS))
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--seqs", type=int, nargs="+", default=[64, 256], help="decoding sequences per batch")
    p.add_argument("--page-size", type=int, default=16)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or tri.INTERPRETED:
        print("benchmarks/kernels.py needs a CUDA GPU and TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    if args.check:
        import pytest

        if pytest.main(["-q", "-p", "no:cacheprovider", str(_HERE.parent / "tests" / "test_kernels.py")]) != 0:
            return 1
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    rows = row_cases(args, dtype) + attention_cases(args, dtype)
    print(f"\n{torch.cuda.get_device_name()}, {args.dtype}, triton {triton.__version__}, torch {torch.__version__}\n")
    print(HEADER)
    for row in rows:
        print(row.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
