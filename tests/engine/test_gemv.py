"""The one-row bf16 kernel (sagellm/model/csrc/gemv.cpp) against float32 arithmetic. PackedLinear
now sends decode rows to gemm_rows_bf16 instead (tests/engine/test_gemm_rows.py)."""

from __future__ import annotations

import pytest
import torch

from sagellm.model import cpu_kernels


@pytest.fixture(scope="module")
def ops(ops):
    # This project's machines (Zen 4, CI's included) have AVX512-BF16: the kernel must run here.
    assert cpu_kernels.has_bf16_dot()
    return ops


def _case(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, k, generator=g).to(torch.bfloat16),
            (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16))


# SmolLM2's layer shapes and lm_head, rows not a multiple of 4, K not a multiple of 32, tiny.
@pytest.mark.parametrize("n,k", [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576),
                                 (7, 576), (1, 40), (130, 77), (5, 31)])
def test_gemv_equals_float32_product_rounded_once(ops, n, k):
    x, w = _case(n, k)
    expected = x.float() @ w.float().T  # the exact products, summed in float32
    got = ops.gemv_bf16(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (1, n)
    # float32 sums in another order, then one rounding to bf16: within one bf16 step of the exact value
    torch.testing.assert_close(got.float(), expected, atol=1e-3, rtol=2 ** -7)


def test_gemv_keeps_leading_dimensions(ops):
    x, w = _case(64, 96)
    assert ops.gemv_bf16(x.view(1, 1, 96), w).shape == (1, 1, 64)


def test_gemv_refuses_what_it_does_not_take(ops):
    x, w = _case(8, 64)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        ops.gemv_bf16(x.float(), w.float())
    with pytest.raises(RuntimeError, match="one contiguous row"):
        ops.gemv_bf16(torch.cat([x, x]), w)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.gemv_bf16(x, w.t().contiguous().t())
