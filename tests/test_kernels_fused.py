"""The fused row kernels (RMSNorm, residual add + RMSNorm, silu * up, the LM head's greedy tail)
against kernels.reference on fresh random inputs, under the Triton interpreter without CUDA
(test_kernels.py sets TRITON_INTERPRET before kernels.triton_ops is imported)."""

from __future__ import annotations

import pytest
import torch

from test_kernels import DEVICE, DTYPES, TOL, _rand, fresh_seed, poisoned_empty  # noqa: F401  (fixtures)

import kernels.reference as ref  # noqa: E402
import kernels.triton_ops as tri  # noqa: E402

pytestmark = [pytest.mark.usefixtures("poisoned_empty"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]   # numpy evaluates both sides of tl.where


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
@pytest.mark.parametrize("width", [64, 200])
def test_rms_norm(dtype: torch.dtype, weight_dtype, width: int) -> None:
    x = _rand(3, 5, width, dtype=dtype) * 3
    weight = (1 + 0.1 * _rand(width, dtype=torch.float32)).to(dtype if weight_dtype == "same" else weight_dtype)
    out, expected = tri.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [48, 960])
def test_add_rmsnorm(dtype: torch.dtype, width: int) -> None:
    x = _rand(11, width + 8, dtype=dtype)[:, 3:width + 3]          # a strided view, like a GEMM slice
    residual = _rand(11, width, dtype=dtype) * 2
    weight = (1 + 0.1 * _rand(width, dtype=torch.float32)).to(dtype)
    normed, new_residual = tri.add_rmsnorm(x, residual, weight, 1e-5)
    normed_ref, residual_ref = ref.add_rmsnorm(x, residual, weight, 1e-5)
    assert new_residual.dtype == dtype and new_residual.is_contiguous()
    if tri.INTERPRETED and dtype == torch.bfloat16:                 # the interpreter truncates to bf16
        torch.testing.assert_close(new_residual, residual_ref, **TOL[dtype])
    else:
        assert torch.equal(new_residual, residual_ref)             # one rounding of the same sum
    torch.testing.assert_close(normed, normed_ref, **TOL[dtype])


def test_add_rmsnorm_rejects_mismatched_residual() -> None:
    x = _rand(4, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="add_rmsnorm: residual"):
        tri.add_rmsnorm(x, x[:, :16], torch.ones(32, device=DEVICE), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f", [40, 1500])                          # 1500: two column blocks
def test_silu_mul(dtype: torch.dtype, f: int) -> None:
    gate_up = _rand(2, 7, 2 * f, dtype=dtype) * 4
    out, expected = tri.silu_mul(gate_up), ref.silu_mul(gate_up)
    assert out.shape == (2, 7, f) and out.dtype == dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [100, 5000])                     # 5000: three column blocks, a ragged end
def test_lm_head_tail(dtype: torch.dtype, vocab: int) -> None:
    logits = _rand(9, vocab, dtype=dtype) * 5
    logits[1, :] = float("-inf")                                     # no usable token
    logits[2, :] = float("nan")
    logits[3, 7] = float("inf")                                      # tamed to the largest float
    logits[4, vocab // 3] = logits[4, vocab - 1] = logits[4].max() + 1  # a tie: the first index wins
    logits[5, ::2] = float("nan")
    logits[6] = logits[6, 0]                                         # every logit equal
    token, logprob, finite = tri.lm_head_tail(logits)
    token_ref, logprob_ref, finite_ref = ref.lm_head_tail(logits)
    assert token.dtype == torch.int64 and logprob.dtype == torch.float32 and finite.dtype == torch.bool
    assert torch.equal(token, token_ref) and torch.equal(finite, finite_ref)
    assert finite.tolist() == [True, False, False, True, True, True, True, True, True]
    torch.testing.assert_close(logprob, logprob_ref, atol=2e-5, rtol=2e-5, equal_nan=True)


def test_lm_head_tail_strided_rows() -> None:
    logits = _rand(6, 300, dtype=torch.float32)[::2]
    for out, expected in zip(tri.lm_head_tail(logits), ref.lm_head_tail(logits)):
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
