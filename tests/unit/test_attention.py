"""The blocked prefill attention against PyTorch's SDPA (float32, GQA, with and without cached
context, chunk lengths around the 64-query block)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sagellm.model.attention_ops import blocked_prefill_attention


@pytest.mark.parametrize("ctx,t", [(0, 64), (0, 200), (37, 64), (300, 129), (1000, 65)])
def test_blocked_prefill_equals_sdpa(ctx, t):
    torch.manual_seed(ctx + t)
    heads, kv_heads, dim = 9, 3, 64
    q = torch.randn(heads, t, dim)
    k = torch.randn(kv_heads, ctx + t, dim)
    v = torch.randn(kv_heads, ctx + t, dim)
    mask = torch.arange(ctx + t)[None, :] <= (ctx + torch.arange(t))[:, None]
    expected = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
    got = blocked_prefill_attention(q, k, v, ctx, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
