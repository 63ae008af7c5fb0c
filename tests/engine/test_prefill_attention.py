"""The flash_prefill_attention kernel (sagellm/model/csrc/prefill_attention.cpp) against float32
attention, read straight from the paged cache through slots, and when the attention takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sagellm.model import cpu_kernels
from sagellm.model.attention import PrefillChunk, StepMetadata, flash_fits


@pytest.fixture(scope="module")
def ops(ops):
    # This project's machines (Zen 4, CI's included) have AVX512-BF16: the kernel must run here.
    assert cpu_kernels.has_bf16_dot()
    return ops


def _reference(q, k, v, ctx, scale):
    """q [t, H, D], k and v [KVH, ctx + t, D] -> float32 causal attention [t, H, D]."""
    t = q.shape[0]
    mask = torch.arange(ctx + t)[None, :] <= (ctx + torch.arange(t))[:, None]
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None].float(), k[None].float(), v[None].float(),
                                          attn_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (16, 2, 64)])
@pytest.mark.parametrize("ctx,t", [(0, 1), (0, 65), (0, 300), (37, 64), (130, 1), (1000, 97)])
def test_flash_prefill_equals_float32_attention(ops, heads, kv_heads, head_dim, ctx, t):
    g = torch.Generator().manual_seed(ctx + t + heads)
    # q as the forward hands it: the q heads of a fused [t, H + KVH, D] projection (strided rows)
    q = torch.randn(t, heads + kv_heads, head_dim, generator=g).bfloat16()[:, :heads]
    k, v = (torch.randn(kv_heads, ctx + t, head_dim, generator=g).bfloat16() for _ in range(2))
    got = ops.flash_prefill_attention(q, k, v, ctx, 0.125)
    assert got.shape == (t, heads, head_dim) and got.dtype == torch.bfloat16
    # bf16 inputs and one bf16 rounding of the probabilities and of the output
    torch.testing.assert_close(got.float(), _reference(q, k, v, ctx, 0.125), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("ramp", [40.0, -40.0])
def test_flash_prefill_follows_a_maximum_that_moves_far(ops, ramp):
    """Scores that climb (or fall) by `ramp` nats across the keys: each row's running maximum is
    passed by more than the kernel's lazy margin (2^8) again and again (climbing) or set by the
    first tile with the rest underflowing toward 0 (falling); the output still equals float32's."""
    g = torch.Generator().manual_seed(11)
    ctx, t, kv_heads, d = 700, 150, 3, 64
    q = torch.randn(t, 9, d, generator=g) * 0.3 + 1.0
    pos = torch.linspace(0, 1, ctx + t)[None, :, None]
    # q . k = 0.125 * d * ramp * pos / 8 = ramp * pos plus noise: a trend of `ramp` nats over the keys
    k = torch.randn(kv_heads, ctx + t, d, generator=g) * 0.3 + ramp * pos / 8
    v = torch.randn(kv_heads, ctx + t, d, generator=g)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    got = ops.flash_prefill_attention(q, k, v, ctx, 0.125)
    torch.testing.assert_close(got.float(), _reference(q, k, v, ctx, 0.125), atol=1e-2, rtol=1e-2)


def test_flash_prefill_reads_the_paged_cache_through_slots(ops):
    g = torch.Generator().manual_seed(7)
    ctx, t, kv_heads, d = 200, 50, 3, 64
    cache_k, cache_v = (torch.randn(kv_heads, 4096, d, generator=g).bfloat16() for _ in range(2))
    slots = torch.randperm(4096, generator=g)[:ctx + t]  # scattered, as paged blocks are
    q = torch.randn(t, 9, d, generator=g).bfloat16()
    got = ops.flash_prefill_attention(q, cache_k, cache_v, ctx, 0.125, slots)
    expected = ops.flash_prefill_attention(q, cache_k[:, slots], cache_v[:, slots], ctx, 0.125)
    assert torch.equal(got, expected)
    torch.testing.assert_close(got.float(), _reference(q, cache_k[:, slots], cache_v[:, slots], ctx, 0.125),
                               atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128)])
def test_a_querys_result_does_not_depend_on_the_chunks_of_its_prompt(ops, heads, kv_heads, head_dim):
    # BATCH_INVARIANT takes this kernel for every prefill chunk (chunks start at multiples of 64) and
    # for a chunk's last row alone (the trimmed last layer): the same bits each way.
    g = torch.Generator().manual_seed(3)
    t = 300
    q = torch.randn(t, heads, head_dim, generator=g).bfloat16()
    k, v = (torch.randn(kv_heads, t, head_dim, generator=g).bfloat16() for _ in range(2))
    whole = ops.flash_prefill_attention(q, k, v, 0, 0.125)
    slots = torch.arange(t)
    for c0 in (64, 128, 256):
        first = ops.flash_prefill_attention(q[:c0].contiguous(), k[:, :c0].contiguous(), v[:, :c0].contiguous(), 0, 0.125)
        rest = ops.flash_prefill_attention(q[c0:].contiguous(), k, v, c0, 0.125, slots)
        assert torch.equal(torch.cat([first, rest]), whole), c0
    for i in (1, 31, 32, 63, 64, 100, 299):
        assert torch.equal(ops.flash_prefill_attention(q[i:i + 1].contiguous(), k, v, i, 0.125, slots[:i + 1])[0],
                           whole[i]), i


def test_flash_prefill_refuses_what_it_does_not_take(ops):
    q, k = torch.randn(4, 9, 64), torch.randn(3, 4, 64)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        ops.flash_prefill_attention(q, k, k, 0, 0.125)
    q, k = torch.randn(4, 9, 32).bfloat16(), torch.randn(3, 4, 32).bfloat16()
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ops.flash_prefill_attention(q, k, k, 0, 0.125)


@pytest.mark.parametrize("case,expected", [
    ("bf16", True), ("float32", False), ("batch_invariant", True), ("window", False), ("softcap", False),
    ("sinks", False), ("no kernels", False)])
def test_flash_taken_only_where_it_computes_the_same_thing(ops, case, expected):
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    query, cache = torch.zeros(1, 9, 8, 64, dtype=dtype), torch.zeros(3, 64, 64, dtype=dtype)
    meta = StepMetadata(cache=None, slot_mapping=torch.arange(8), num_decode=0, decode_blocks=None,
                        decode_bias=None, prefills=[PrefillChunk(0, 8, 0, None, None)],
                        kernels=None if case == "no kernels" else ops, batch_invariant=case == "batch_invariant")
    assert flash_fits(meta, query, cache, 4 if case == "window" else 0, 30.0 if case == "softcap" else 0.0,
                      torch.zeros(9) if case == "sinks" else None) is expected
