"""The one-row bf16 kernel (sagellm/model/csrc/gemv.cpp) against float32 arithmetic, and where
PackedLinear (sagellm/model/cpu_linear.py) takes it: one row, never under BATCH_INVARIANT."""

from __future__ import annotations

import pytest
import torch

from sagellm.model import cpu_kernels, cpu_linear


@pytest.fixture(scope="module")
def ops(ops):
    # This project's machines (Zen 4, CI's included) have AVX512-BF16: the kernel must run here.
    assert cpu_kernels.has_bf16_dot()
    return ops


_SMALL = torch.nn.Linear(64, 48, dtype=torch.bfloat16)  # a model of 6 KB of linear weights


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


def test_packed_linear_takes_gemv_for_one_row_only(ops):
    x, w = _case(48, 64)
    bias = torch.randn(48).to(torch.bfloat16)
    lin = cpu_linear.PackedLinear(w, bias, gemv=cpu_linear.gemv_kernel(ops, _SMALL))
    assert lin.gemv is not None
    assert torch.equal(lin(x), ops.gemv_bf16(x, w) + bias)
    rows = torch.cat([x, x, x])  # more rows: oneDNN's packed matmul, as before
    oned = torch.ops.mkldnn._linear_pointwise(rows, lin.packed, bias, "none", [], "")
    assert torch.equal(lin(rows), oned)


def test_batch_invariant_linear_never_takes_gemv(ops):
    # A row's result must not depend on how many rows the step holds.
    _, w = _case(48, 64)
    lin = cpu_linear.PackedLinear(w, None, row_tile=8, gemv=cpu_linear.gemv_kernel(ops, _SMALL))
    assert lin.gemv is None and lin.weight is None


def test_loaded_bf16_model_decodes_one_row_on_gemv(loaded_model):
    from sagellm.model.loader import load_weights
    from sagellm.settings import Settings

    model = load_weights(loaded_model.source.path, Settings(dtype="bfloat16"), "cpu")
    linears = [m for m in (model.fast.lm_head, *(l.qkv for l in model.fast.layers))]
    assert all(isinstance(m, cpu_linear.PackedLinear) and m.gemv is not None for m in linears)
    bi = load_weights(loaded_model.source.path, Settings(dtype="bfloat16", batch_invariant=True), "cpu")
    assert bi.fast.lm_head.gemv is None


def test_gemv_off_where_its_weight_copy_passes_the_limit(ops, monkeypatch, caplog):
    # The kernel keeps a row-major copy of every linear weight; a model whose copy would pass the
    # limit keeps one rows on oneDNN, and the log says so.
    assert cpu_linear.linear_weight_bytes(_SMALL) == 48 * 64 * 2
    monkeypatch.setattr(cpu_linear, "GEMV_COPY_LIMIT", 48 * 64 * 2)
    assert cpu_linear.gemv_kernel(ops, _SMALL) is not None
    monkeypatch.setattr(cpu_linear, "GEMV_COPY_LIMIT", 48 * 64 * 2 - 1)
    with caplog.at_level("INFO", logger="sagellm.model.cpu_linear"):
        assert cpu_linear.gemv_kernel(ops, _SMALL) is None
    assert "one-row bf16 kernel off" in caplog.text
