"""Triton kernels vs their torch references (kernels.reference) on fresh random inputs.

Without CUDA the kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET must be
set before kernels.triton_ops is imported (triton 3.6 binds the interpreter at decoration time).
With CUDA the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kernels  # noqa: E402
import kernels.reference as ref  # noqa: E402
import kernels.triton_ops as tri  # noqa: E402
from morserve.model.layers import rope_cos_sin  # noqa: E402

if not torch.cuda.is_available() and not tri.INTERPRETED:
    raise RuntimeError("kernels.triton_ops was imported without TRITON_INTERPRET=1 before this module ran")

# The interpreter converts the loaded loop bound of a `range` through a 1-element array.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = torch.device("cpu" if tri.INTERPRETED else "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The interpreter truncates fp32 -> bf16 casts and attention feeds bf16/fp16 probabilities to the PV dot.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")  # shown by pytest when the test fails
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.empty returns NaN-filled float tensors, so an output element a kernel forgot to write
    shows up as NaN instead of happening to hold the right value."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)


def _rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _strided(t: int, heads: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """[t, heads, d] view with a padded row stride, as produced by splitting a fused projection."""
    return _rand(t, heads + 3, d, dtype=dtype)[:, 1:heads + 1]


# --- gather / scatter -------------------------------------------------------------------------------

@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("width", [48, 2500])  # 2500: more than one column block per row
def test_gather_rows(dtype: torch.dtype, index_dtype: torch.dtype, width: int) -> None:
    pool = _rand(37, width, dtype=dtype)
    index = torch.randint(0, 37, (11,), device=DEVICE, dtype=index_dtype)
    out = tri.gather_rows(pool, index)
    assert out.shape == (11, width) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref.gather_rows(pool, index))


@pytest.mark.usefixtures("poisoned_empty")
def test_gather_rows_strided_pool() -> None:
    pool = _rand(20, 64, dtype=torch.float32)[:, ::2]
    index = torch.randperm(20, device=DEVICE)[:7]
    assert torch.equal(tri.gather_rows(pool, index), ref.gather_rows(pool, index))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_scatter_rows(dtype: torch.dtype, index_dtype: torch.dtype) -> None:
    pool = torch.full((40, 80), float("nan"), device=DEVICE, dtype=dtype)
    index = torch.randperm(40, device=DEVICE)[:13].to(index_dtype)
    rows = _rand(13, 80, dtype=dtype)
    expected = pool.clone()
    ref.scatter_rows(expected, index, rows)
    tri.scatter_rows(pool, index, rows)
    assert torch.equal(pool.nan_to_num(7.0), expected.nan_to_num(7.0))  # untouched rows stay NaN


@pytest.mark.parametrize("pool_dtype", [torch.float16, torch.bfloat16])
def test_scatter_rows_casts_to_pool_dtype(pool_dtype: torch.dtype) -> None:
    pool = _rand(30, 64, dtype=pool_dtype)
    index = torch.randperm(30, device=DEVICE)[:9]
    rows = _rand(9, 64, dtype=torch.float32)
    expected = pool.clone()
    ref.scatter_rows(expected, index, rows)
    tri.scatter_rows(pool, index, rows)
    torch.testing.assert_close(pool, expected, **TOL[pool_dtype])


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
@pytest.mark.parametrize("width", [64, 200])
def test_gather_rows_rmsnorm(dtype: torch.dtype, weight_dtype, width: int) -> None:
    pool = _rand(25, width, dtype=dtype) * 3
    index = torch.randint(0, 25, (9,), device=DEVICE, dtype=torch.int32)
    weight = (1 + 0.1 * _rand(width, dtype=torch.float32)).to(dtype if weight_dtype == "same" else weight_dtype)
    rows, normed = tri.gather_rows_rmsnorm(pool, index, weight, 1e-6)
    rows_ref, normed_ref = ref.gather_rows_rmsnorm(pool, index, weight, 1e-6)
    assert torch.equal(rows, rows_ref)
    assert normed.dtype == normed_ref.dtype
    torch.testing.assert_close(normed, normed_ref, **TOL[dtype])


# --- paged KV store ---------------------------------------------------------------------------------

def _caches(num_pages: int, page_size: int, hkv: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_pages, page_size, hkv, d)
    nan = float("nan")
    return (torch.full(shape, nan, device=DEVICE, dtype=dtype), torch.full(shape, nan, device=DEVICE, dtype=dtype))


def _addresses(t: int, num_pages: int, page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block_tables, query_group, entries) of t rows writing distinct cache slots on shuffled pages,
    every third row writing nothing (entry -1). The tables are one layer column (a strided view) of
    a [groups, pages, 3 layers] table, as the engine passes them."""
    groups = 3
    width = -(-num_pages // groups)
    pages = torch.randperm(num_pages, device=DEVICE)
    tables = torch.full((groups, width, 3), -1, dtype=torch.int32, device=DEVICE)
    flat = torch.full((groups * width,), -1, dtype=torch.int32, device=DEVICE)
    flat[:num_pages] = pages.to(torch.int32)
    tables[:, :, 1] = flat.view(groups, width)
    cells = torch.randperm(num_pages * page_size, device=DEVICE)[:t]         # (group, entry) cells, distinct
    group, entry = cells // (width * page_size), cells % (width * page_size)
    entry[::3] = -1
    return tables[:, :, 1], group, entry


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,hkv,d", [(4, 2, 16), (16, 3, 32)])
def test_store_kv(dtype: torch.dtype, page_size: int, hkv: int, d: int) -> None:
    t, pages = 10, 6
    k, v = _strided(t, hkv, d, dtype), _strided(t, hkv, d, dtype)
    tables, group, entry = _addresses(t, pages, page_size)
    k_cache, v_cache = _caches(pages, page_size, hkv, d, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref.store_kv(k, v, k_ref, v_ref, tables, group, entry)
    tri.store_kv(k, v, k_cache, v_cache, tables, group.to(torch.int32), entry)
    assert not k_ref.isnan().all()                                                 # something was written
    torch.testing.assert_close(k_cache, k_ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,h,hkv,d", [(4, 4, 2, 16), (16, 3, 3, 64)])
def test_store_kv_rope(dtype: torch.dtype, page_size: int, h: int, hkv: int, d: int) -> None:
    t, pages, max_positions = 7, 5, 4096
    q, k, v = _strided(t, h, d, dtype), _strided(t, hkv, d, dtype), _strided(t, hkv, d, dtype)
    cos, sin = rope_cos_sin(torch.arange(max_positions, device=DEVICE), d, 10000.0, dtype)
    positions = torch.randint(0, max_positions, (t,), device=DEVICE)
    tables, group, entry = _addresses(t, pages, page_size)
    k_cache, v_cache = _caches(pages, page_size, hkv, d, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref_out = ref.store_kv_rope(q, k, v, cos, sin, positions, k_ref, v_ref, tables, group, entry)
    q_out = tri.store_kv_rope(q, k, v, cos, sin, positions, k_cache, v_cache, tables, group, entry)
    assert q_out.dtype == dtype and q_out.is_contiguous()
    torch.testing.assert_close(q_out, q_ref_out, **TOL[dtype])
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0, equal_nan=True)


# --- phase ends and routing -------------------------------------------------------------------------

def _route_state(t: int, n: int, d: int, dtype: torch.dtype, nr: int = 4) -> dict:
    """Pool-indexed routing state for t rows on distinct pool rows of an n-row pool (scores in
    [0, 0.5): gate weights, whose products with the stream stay small enough for the bf16 tolerance)."""
    return dict(pool=_rand(n, d, dtype=dtype), copy=_rand(n, d, dtype=dtype),
                index=torch.randperm(n, device=DEVICE)[:t],
                x=_rand(t, d, dtype=dtype), residual=_rand(t, d, dtype=dtype),
                score=torch.rand(n, device=DEVICE) * 0.5, cap=torch.randint(1, nr + 1, (n,), device=DEVICE),
                threshold=torch.rand(n, device=DEVICE), depth=torch.randint(1, nr + 1, (t,), device=DEVICE),
                target=torch.randint(1, nr + 1, (t,), device=DEVICE), bias=torch.randn(nr, device=DEVICE) * 0.1)


def _both(op: str, state: dict, names: tuple[str, ...], *extra, mutated: tuple[str, ...]):
    """Run kernels.reference.<op> and kernels.triton_ops.<op> on copies of `state`; returns
    (reference output, Triton output, reference state, Triton state)."""
    ref_state = {k: v.clone() for k, v in state.items()}
    tri_state = {k: v.clone() for k, v in state.items()}
    ref_out = getattr(ref, op)(*(ref_state[n] if n in ref_state else None for n in names), *extra)
    tri_out = getattr(tri, op)(*(tri_state[n] if n in tri_state else None for n in names), *extra)
    for name in state:
        if name not in mutated:
            assert torch.equal(ref_state[name], tri_state[name]), f"{op} changed {name}"
    return ref_out, tri_out, ref_state, tri_state


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual, copy, temp", [(True, False, None), (True, True, 1.5), (False, False, 0.7)])
def test_scatter_stream(dtype: torch.dtype, residual: bool, copy: bool, temp: float | None) -> None:
    state = _route_state(9, 13, 200, dtype)
    names = ("pool", "index", "x", "residual" if residual else "-", "copy" if copy else "-")
    ref_out, tri_out, ref_state, tri_state = _both("scatter_stream", state, names, temp, mutated=("pool", "copy"))
    torch.testing.assert_close(tri_state["pool"], ref_state["pool"], **TOL[dtype])
    torch.testing.assert_close(tri_state["copy"], ref_state["copy"], **TOL[dtype])
    if temp is None:
        assert ref_out is None and tri_out is None
    else:
        torch.testing.assert_close(tri_out, ref_out, **TOL[dtype])


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_plain_and_token(dtype: torch.dtype) -> None:
    state = _route_state(11, 16, 96, dtype)
    ref_cont, tri_cont, ref_state, tri_state = _both("update_plain", state, ("pool", "index", "x", "residual", "depth",
                                                                             "cap"), mutated=("pool",))
    assert tri_cont.dtype == torch.bool and torch.equal(tri_cont, ref_cont)
    torch.testing.assert_close(tri_state["pool"], ref_state["pool"], **TOL[dtype])
    state["target"][::2] = state["depth"][::2]                                    # half at their final recursion
    ref_cont, tri_cont, ref_state, tri_state = _both("update_token", state, ("pool", "index", "x", "residual", "copy",
                                                                             "score", "depth", "target"),
                                                     mutated=("pool",))
    assert torch.equal(tri_cont, ref_cont)
    torch.testing.assert_close(tri_state["pool"], ref_state["pool"], **TOL[dtype])


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("router_func", ["sigmoid", "tanh"])
def test_update_expert_and_decide(dtype: torch.dtype, router_func: str) -> None:
    state = _route_state(70, 80, 64, dtype)                                       # 70 rows: two decision programs
    ref_out, tri_out, ref_state, tri_state = _both("update_expert", state, ("pool", "index", "x", "residual", "score"),
                                                   0.3, router_func, 1.5, mutated=("pool",))
    torch.testing.assert_close(tri_out, ref_out, **TOL[dtype])
    torch.testing.assert_close(tri_state["pool"], ref_state["pool"], **TOL[dtype])
    state["raw"] = _rand(70, 4, dtype=dtype)[:, :3]                               # 3 routers, strided scores
    names = ("raw", "depth", "index", "score", "cap", "threshold", "bias")
    state["depth"] = state["depth"].clamp(max=3)
    state["cap"] = state["cap"].clamp(max=3)
    ref_cont, tri_cont, ref_state, tri_state = _both("expert_decide", state, names, router_func, mutated=("score",))
    torch.testing.assert_close(tri_state["score"], ref_state["score"], atol=0, rtol=0)
    assert tri_cont.dtype == torch.bool and torch.equal(tri_cont, ref_cont)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nr", [3, 4])
def test_token_decide(dtype: torch.dtype, nr: int) -> None:
    state = _route_state(70, 75, 8, dtype, nr)
    state["logits"] = _rand(70, nr, dtype=dtype) * 3
    ref_depth, tri_depth, ref_state, tri_state = _both("token_decide", state, ("logits", "index", "score", "cap",
                                                                               "bias"), 0.1, mutated=("score",))
    assert tri_depth.dtype == torch.int64 and torch.equal(tri_depth, ref_depth)
    torch.testing.assert_close(tri_state["score"], ref_state["score"], atol=1e-6, rtol=1e-5)


# --- paged attention --------------------------------------------------------------------------------

# Groups (a sequence at one cache depth) as (entries cached before this tick, query rows this tick):
# one query row = a decode step, several = a prefill chunk whose row i sees prefix + i + 1 entries.
_GROUPS = [(37, 1), (0, 4), (150, 1), (20, 3), (64, 1), (90, 2)]


def _paged_batch(dtype: torch.dtype, h: int, hkv: int, d: int, page_size: int,
                 shuffle: bool = True) -> dict[str, torch.Tensor]:
    """A mixed decode/prefill batch over shuffled, non-contiguous pages. Cache entries nobody may
    read (spare pages, page tails) are NaN, unused block-table entries -1, and the table has a row
    no query uses, so the kernel must follow query_group rather than row order. `shuffle`
    interleaves the rows of all groups; otherwise each chunk's rows are contiguous and in position
    order (the engine's layout, whose rows share query tiles)."""
    lengths = [ctx + n for ctx, n in _GROUPS]
    needed = [-(-n // page_size) for n in lengths]
    num_pages = sum(needed) + 5
    k_cache, v_cache = _caches(num_pages, page_size, hkv, d, dtype)
    table_rows = torch.randperm(len(_GROUPS) + 1, device=DEVICE)  # group g -> table row table_rows[g]
    block_tables = torch.full((len(_GROUPS) + 1, max(needed) + 2), -1, device=DEVICE, dtype=torch.int32)
    pages = torch.randperm(num_pages, device=DEVICE).split(needed + [5])
    groups, kv_lens = [], []
    for g, ((ctx, n), length, own) in enumerate(zip(_GROUPS, lengths, pages)):
        block_tables[table_rows[g], : len(own)] = own.to(torch.int32)
        slots = own.repeat_interleave(page_size) * page_size + torch.arange(page_size, device=DEVICE).repeat(len(own))
        flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
        flat_k[slots[:length]] = _rand(length, hkv, d, dtype=dtype)
        flat_v[slots[:length]] = _rand(length, hkv, d, dtype=dtype)
        groups += [int(table_rows[g])] * n
        kv_lens += range(ctx + 1, ctx + n + 1)
    groups.append(int(table_rows[1]))  # a row that sees nothing: zeros, not NaN
    kv_lens.append(0)
    order = torch.randperm(len(groups), device=DEVICE) if shuffle else torch.arange(len(groups), device=DEVICE)
    return dict(q=_strided(len(groups), h, d, dtype), k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                query_group=torch.tensor(groups, device=DEVICE, dtype=torch.int32)[order],
                kv_lens=torch.tensor(kv_lens, device=DEVICE, dtype=torch.int32)[order])


# (page size, H, Hkv, D): GQA 1 / 4 / 3, every head dim and page size, each dtype on two of them.
_ATTENTION_SHAPES = [(4, 2, 2, 16), (16, 8, 2, 32), (4, 6, 2, 64)]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype,shape", [pytest.param(dtype, shape, id=f"{str(dtype)[6:]}-{'-'.join(map(str, shape))}")
                                         for i, dtype in enumerate(DTYPES)
                                         for shape in (_ATTENTION_SHAPES * 2)[i:i + 2]])
def test_paged_attention(dtype: torch.dtype, shape: tuple[int, int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    import kernels.attention as attention

    monkeypatch.setattr(attention, "MAX_SPLITS", 2)  # each split is one more interpreted program per tile
    page_size, h, hkv, d = shape
    batch = _paged_batch(dtype, h, hkv, d, page_size)
    out = tri.paged_attention(**batch, scale=d ** -0.5)
    expected = ref.paged_attention(**batch, scale=d ** -0.5)
    assert out.shape == batch["q"].shape and out.dtype == dtype
    assert not expected.isnan().any()
    torch.testing.assert_close(out, expected, **TOL[dtype])
    assert torch.all(out[batch["kv_lens"] == 0] == 0)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (16, 8, 2, 32)), (torch.float32, (4, 6, 2, 64)),
                                         (torch.bfloat16, (4, 2, 2, 16))])
def test_paged_attention_tiles_and_splits(dtype: torch.dtype, shape: tuple[int, int, int, int], splits: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk rows in the engine's order (multi-row query tiles), with split-KV off and at its maximum."""
    import kernels.attention as attention

    page_size, h, hkv, d = shape
    batch = _paged_batch(dtype, h, hkv, d, page_size, shuffle=False)
    monkeypatch.setattr(attention, "TARGET_PROGRAMS", 1 if splits == 1 else 1 << 20)
    monkeypatch.setattr(attention, "MAX_SPLITS", splits)
    assert attention.attention_config(len(batch["q"]), h, hkv, d, page_size, dtype)["NUM_SPLITS"] == splits
    out = tri.paged_attention(**batch, scale=d ** -0.5)
    torch.testing.assert_close(out, ref.paged_attention(**batch, scale=d ** -0.5), **TOL[dtype])
    assert torch.all(out[batch["kv_lens"] == 0] == 0)


def test_reference_paged_attention_is_causal_attention() -> None:
    """The oracle itself: one prompt prefilled on shuffled pages equals dense causal GQA attention."""
    t, h, hkv, d, page_size = 11, 4, 2, 16, 4
    q, k, v = (torch.randn(t, n, d) for n in (h, hkv, hkv))
    pages = torch.randperm(8)[: -(-t // page_size)]
    k_cache, v_cache = torch.zeros(8, page_size, hkv, d), torch.zeros(8, page_size, hkv, d)
    ref.store_kv(k, v, k_cache, v_cache, pages[None], torch.zeros(t, dtype=torch.long), torch.arange(t))
    out = ref.paged_attention(q, k_cache, v_cache, pages[None].int(), torch.zeros(t, dtype=torch.int32),
                              torch.arange(1, t + 1, dtype=torch.int32), d ** -0.5)
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(h // hkv, 1).transpose(0, 1),
                                           v.repeat_interleave(h // hkv, 1).transpose(0, 1), is_causal=True)
    torch.testing.assert_close(out, dense.transpose(0, 1), **TOL[torch.float32])


# --- edge cases and dispatch ------------------------------------------------------------------------

def test_empty_batch() -> None:
    pool, none = _rand(5, 32, dtype=torch.float32), torch.zeros(0, dtype=torch.int32, device=DEVICE)
    assert tri.gather_rows(pool, none).shape == (0, 32)
    tri.scatter_rows(pool, none, pool[:0])
    assert tri.gather_rows_rmsnorm(pool, none, pool[0], 1e-6)[1].shape == (0, 32)
    k_cache, v_cache = _caches(2, 4, 2, 16, torch.float32)
    empty = _rand(0, 2, 16, dtype=torch.float32)
    tri.store_kv(empty, empty, k_cache, v_cache, none.view(1, 0), none, none)
    assert tri.paged_attention(empty, k_cache, v_cache, none.view(1, 0), none, none, 0.25).shape == (0, 2, 16)


def test_dispatch_on_cpu_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in kernels.__all__:
        monkeypatch.setattr(tri, name, None)  # calling the Triton path would fail
    pool = torch.randn(6, 8)
    index = torch.tensor([4, 0])
    assert torch.equal(kernels.gather_rows(pool, index), pool[index])
    rows, _ = kernels.gather_rows_rmsnorm(pool, index=index, weight=torch.ones(8), eps=1e-6)
    assert torch.equal(rows, pool[index])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dispatch_on_cuda_uses_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(tri, "gather_rows", lambda pool, index: calls.append(pool) or pool[index])
    pool = torch.randn(6, 8, device="cuda")
    kernels.gather_rows(pool, torch.tensor([1], device="cuda"))
    assert len(calls) == 1


# --- the engine on the Triton kernels -----------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the engine tests use the kernels already")
@pytest.mark.parametrize("router, kv_mode", [("expert", "recursion"), ("token", "share_first")])
def test_engine_on_interpreted_kernels_matches_reference(router, kv_mode, monkeypatch):
    """The engine's CUDA code path on CPU: every hot-path op is the Triton kernel (interpreted),
    with the padded static block pass and the multi-step decode loop, i.e. the exact arguments
    the GPU sees (scratch-row padding, slot -1, kv_len 0 rows, int64 indices)."""
    from engine_utils import check_against_reference, run_to_completion, tiny_model
    from morserve.engine import EngineArgs, LLMEngine, SamplingParams
    from morserve.engine.cuda_graphs import graph_sizes

    import kernels.attention as attention

    for op in kernels.__all__:
        monkeypatch.setattr(kernels, op, getattr(tri, op))
    monkeypatch.setattr(attention, "MAX_SPLITS", 2)  # split-KV on, without 16 interpreted programs per tile
    model = tiny_model(router, kv_mode, 2, seed=int(torch.randint(0, 1 << 30, (1,))))
    engine = LLMEngine(model, None, EngineArgs(model=model, max_num_batched_tokens=16, block_size=4,
                                                num_kv_blocks=400, max_num_seqs=4, num_scheduler_steps=3))
    engine.runner.use_graphs(graph_sizes(8), engine.max_model_len, capture=False)
    loop_runs, launch_loop = [], engine.decode_loop.launch
    engine.decode_loop.launch = lambda *args: loop_runs.append(args) or launch_loop(*args)
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    prompts = {"a": [3, 1, 4, 1, 5], "b": [9, 2], "c": [6, 5, 3, 5, 8, 9, 7]}
    results = run_to_completion(engine, {0: [("a", prompts["a"], params), ("b", prompts["b"], params)],
                                         2: [("c", prompts["c"], params)]})
    ties = sum(check_against_reference(model, p, results[r].outputs[0].token_ids, results[r].outputs[0].depths)
               for r, p in prompts.items())
    assert ties <= 1
    assert loop_runs, "the decode loop never ran"
    assert engine.check_no_leak()
