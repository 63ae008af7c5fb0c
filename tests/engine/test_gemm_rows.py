"""The few-rows bf16 kernel (sagellm/model/csrc/gemm_rows.cpp) against float32 arithmetic, a row's
result the same in any batch of 1..512 rows, and where PackedLinear (sagellm/model/cpu_linear.py)
takes it: up to ROWS_LIMIT rows, every call under BATCH_INVARIANT."""

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


def _case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g).to(torch.bfloat16),
            (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16))


def _rows(ops, x, w):
    return ops.gemm_rows_bf16(x, cpu_linear.pack_rows_weight(w), w.shape[0])


def test_packing_puts_each_pair_of_k_of_64_columns_side_by_side():
    _, w = _case(1, 70, 5)
    p = cpu_linear.pack_rows_weight(w)
    assert p.shape == (2, 3, 64, 2)
    assert p[1, 2, 3, 0] == w[67, 4] and p[1, 2, 3, 1] == 0 and p[0, 1, 63, 1] == w[63, 3]
    assert p[1, :, 6:].abs().sum() == 0  # columns 70 .. 127: zero


# SmolLM2's layer shapes and lm_head at decode batch sizes; then columns not a multiple of 64 or
# of 16, K odd or under 32, one column, rows not a multiple of the 6-row tile.
@pytest.mark.parametrize("n,k,m", [(960, 576, 16), (576, 576, 2), (3072, 576, 64), (576, 1536, 5),
                                   (49152, 576, 8), (7, 576, 3), (1, 40, 13), (130, 77, 7), (70, 1, 6),
                                   (5, 31, 1), (960, 576, 300), (130, 77, 129)])
def test_gemm_rows_equals_float32_product_rounded_once(ops, n, k, m):
    x, w = _case(m, n, k)
    expected = x.float() @ w.float().T  # the exact products, summed in float32
    got = _rows(ops, x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # float32 sums in another order, then one rounding to bf16: within one bf16 step of the exact value
    torch.testing.assert_close(got.float(), expected, atol=1e-3, rtol=2 ** -7)


@pytest.mark.parametrize("n,k", [(960, 576), (130, 77)])
def test_a_rows_result_does_not_depend_on_its_batch(ops, n, k):
    # Decode batches (1..65 rows) and prefill chunks (BATCH_INVARIANT sends them here too).
    x, w = _case(512, n, k)
    p = cpu_linear.pack_rows_weight(w)
    alone = torch.cat([ops.gemm_rows_bf16(x[i:i + 1], p, n) for i in range(512)])
    for m in [*range(1, 66), 128, 300, 512]:
        assert torch.equal(ops.gemm_rows_bf16(x[:m], p, n), alone[:m]), m
    others, _ = _case(300, n, k, seed=1)  # the same rows among other neighbours, in other places
    others[37], others[299] = x[5], x[400]
    got = ops.gemm_rows_bf16(others, p, n)
    assert torch.equal(got[37], alone[5]) and torch.equal(got[299], alone[400])


def test_gemm_rows_keeps_leading_dimensions(ops):
    x, w = _case(3, 64, 96)
    assert _rows(ops, x.view(1, 3, 96), w).shape == (1, 3, 64)


def test_gemm_rows_refuses_what_it_does_not_take(ops):
    x, w = _case(4, 8, 64)
    p = cpu_linear.pack_rows_weight(w)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        ops.gemm_rows_bf16(x.float(), p.float(), 8)
    with pytest.raises(RuntimeError, match="packing of W"):
        ops.gemm_rows_bf16(x, p, 65)  # two column blocks, one packed
    with pytest.raises(RuntimeError, match="packing of W"):
        ops.gemm_rows_bf16(x[:, :62].contiguous(), p, 8)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.gemm_rows_bf16(x.t().contiguous().t(), p, 8)


def test_packed_linear_takes_the_kernel_up_to_the_rows_limit(ops):
    x, w = _case(cpu_linear.ROWS_LIMIT + 1, 48, 64)
    bias = torch.randn(48).to(torch.bfloat16)
    lin = cpu_linear.PackedLinear(w, bias, rows=cpu_linear.rows_kernel(ops, _SMALL))
    calls = []
    kernel = lin.rows
    lin.rows = lambda *a: calls.append(a[0].shape) or kernel(*a)
    for m in (1, 2, 17, cpu_linear.ROWS_LIMIT):
        assert torch.equal(lin(x[:m]), _rows(ops, x[:m], w) + bias)
    assert torch.equal(lin(x[:4].view(1, 4, 64)), (_rows(ops, x[:4], w) + bias).view(1, 4, 48))
    assert calls == [(1, 64), (2, 64), (17, 64), (64, 64), (1, 4, 64)]
    oned = torch.ops.mkldnn._linear_pointwise(x, lin.packed, bias, "none", [], "")
    assert torch.equal(lin(x), oned) and len(calls) == 5  # more rows (a prefill chunk): oneDNN


def test_batch_invariant_linear_takes_the_kernel_at_any_rows(ops):
    # BATCH_INVARIANT: prefill chunks too, so that a prompt's rows come out the same whether it is
    # prefilled alone or beside others; the kernel then holds the only copy of the weight.
    x, w = _case(300, 48, 64)
    bias = torch.randn(48).to(torch.bfloat16)
    lin = cpu_linear.PackedLinear(w, bias, row_tile=8, rows=cpu_linear.rows_kernel(ops, _SMALL, sole=True))
    calls = []
    kernel = lin.rows
    lin.rows = lambda *a: calls.append(a[0].shape[0]) or kernel(*a)
    for m in (1, 65, 300):
        assert torch.equal(lin(x[:m]), _rows(ops, x[:m], w) + bias)
    assert calls == [1, 65, 300] and lin.packed is None
    # Without the kernel: oneDNN on rows padded to a multiple of 8.
    pad = cpu_linear.PackedLinear(w, bias, row_tile=8)
    oned = torch.ops.mkldnn._linear_pointwise(cpu_linear.pad_rows(x[:5], 8), pad.packed, bias, "none", [], "")
    assert torch.equal(pad(x[:5]), oned[:5])


def test_loaded_bf16_model_decodes_on_the_kernel(loaded_model):
    from sagellm.model.loader import load_weights
    from sagellm.settings import Settings

    model = load_weights(loaded_model.source.path, Settings(dtype="bfloat16"), "cpu")
    linears = [model.fast.lm_head, *(l.qkv for l in model.fast.layers), *(l.down for l in model.fast.layers)]
    assert all(isinstance(m, cpu_linear.PackedLinear) and m.rows is not None for m in linears)
    bi = load_weights(loaded_model.source.path, Settings(dtype="bfloat16", batch_invariant=True), "cpu")
    linears = [bi.fast.lm_head, *(l.qkv for l in bi.fast.layers), *(l.down for l in bi.fast.layers)]
    assert all(m.rows is not None and m.rows_limit is None and m.packed is None for m in linears)


def test_kernel_off_where_its_weight_copy_passes_the_limit(ops, monkeypatch, caplog):
    # The kernel keeps a second copy of every linear weight; a model whose copy would pass the
    # limit stays on oneDNN, and the log says so.
    assert cpu_linear.linear_weight_bytes(_SMALL) == 48 * 64 * 2
    monkeypatch.setattr(cpu_linear, "GEMV_COPY_LIMIT", 48 * 64 * 2)
    assert cpu_linear.rows_kernel(ops, _SMALL) is not None
    monkeypatch.setattr(cpu_linear, "GEMV_COPY_LIMIT", 48 * 64 * 2 - 1)
    with caplog.at_level("INFO", logger="sagellm.model.cpu_linear"):
        assert cpu_linear.rows_kernel(ops, _SMALL) is None
    assert "few-rows bf16 kernel off" in caplog.text
    # BATCH_INVARIANT keeps no second copy: no limit.
    assert cpu_linear.rows_kernel(ops, _SMALL, sole=True) is not None
