"""Attention over the paged KV cache for a packed step: decode tokens first, then prefill chunks.

Registered with transformers' AttentionInterface, so any model that routes attention through it
(Llama, Mistral, Qwen2, ...) runs on our cache; the model's own q/k/v projections, RoPE and
tensor-parallel plan stay as transformers defines them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "sagellm_paged"


@dataclass
class PrefillChunk:
    q_start: int  # offset of the chunk in the packed token dimension
    q_len: int
    ctx_len: int  # tokens of this sequence already in the cache
    slots: torch.Tensor | None  # [ctx_len + q_len] flat slots, when ctx_len > 0
    mask: torch.Tensor | None  # [q_len, ctx_len + q_len] bool, when ctx_len > 0


@dataclass
class StepMetadata:
    cache: "PagedKVCache"  # noqa: F821 - engine.kv_cache
    slot_mapping: torch.Tensor  # [T] flat slot of every new token
    num_decode: int
    decode_blocks: torch.Tensor | None  # [B_decode, NB] block table of each context (0-padded)
    decode_bias: torch.Tensor | None  # [B_decode, 1, 1, NB * block_size] float32, -inf past each end
    prefills: list[PrefillChunk]
    decode_rows: torch.Tensor | None = None  # [KVH * B_decode * NB] rows of the [KVH * blocks, ...] cache view

    def __post_init__(self):
        if self.decode_blocks is not None and self.decode_rows is None:
            heads = torch.arange(self.cache.num_kv_heads, device=self.decode_blocks.device)
            self.decode_rows = (heads[:, None] * self.cache.num_blocks + self.decode_blocks.view(1, -1)).view(-1)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query: [1, H, T, D]; key, value: [1, KVH, T, D] for the T packed new tokens.
    meta: StepMetadata = kwargs["sagellm_meta"]
    k_cache = meta.cache.keys[module.layer_idx]  # [KVH, S, D]
    v_cache = meta.cache.values[module.layer_idx]
    k_cache.index_copy_(1, meta.slot_mapping, key[0].to(k_cache.dtype))
    v_cache.index_copy_(1, meta.slot_mapping, value[0].to(v_cache.dtype))

    outputs = []
    nd = meta.num_decode
    if nd:
        outputs.append(_decode_attention(query[0, :, :nd], k_cache, v_cache, meta, scaling))
    for chunk in meta.prefills:
        sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        q = query[:, :, sl]  # [1, H, t, D]
        if chunk.ctx_len == 0:
            o = F.scaled_dot_product_attention(q, key[:, :, sl], value[:, :, sl], is_causal=True,
                                               scale=scaling, enable_gqa=True)
        else:
            k = k_cache[:, chunk.slots].unsqueeze(0)  # [1, KVH, ctx + t, D]
            v = v_cache[:, chunk.slots].unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk.mask, scale=scaling,
                                               enable_gqa=True)
        outputs.append(o[0].transpose(0, 1))  # [t, H, D]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return out.unsqueeze(0), None  # [1, T, H, D]


def _decode_attention(q, k_cache, v_cache, meta: StepMetadata, scaling) -> torch.Tensor:
    """One query token per sequence. q: [H, B, D] -> [B, H, D].

    Written out rather than SDPA: measured on CPU, SDPA's kernel for a single query row is 7-16x
    slower than these two grouped matmuls (docs/performance.md), and whole-block index_select
    gathers the context 6x faster than per-token indexing.
    """
    num_heads, batch, head_dim = q.shape
    num_kv = k_cache.shape[0]
    group = num_heads // num_kv
    bs = meta.cache.block_size
    length = meta.decode_blocks.shape[1] * bs
    # Whole blocks of every (kv head, sequence), gathered along dim 0 so the copy runs in parallel
    # over rows: [KVH * B * NB, bs, D] -> one [L, D] context per (kv head, sequence).
    k = k_cache.view(-1, bs, head_dim).index_select(0, meta.decode_rows).view(num_kv * batch, length, head_dim)
    v = v_cache.view(-1, bs, head_dim).index_select(0, meta.decode_rows).view(num_kv * batch, length, head_dim)
    qg = q.view(num_kv, group, batch, head_dim).transpose(1, 2).reshape(num_kv * batch, group, head_dim)
    scale = scaling if scaling is not None else head_dim ** -0.5
    scores = torch.bmm(qg, k.transpose(1, 2)).float().view(num_kv, batch, group, length) * scale
    bias = meta.decode_bias.view(1, batch, 1, length)  # softmax in fp32
    probs = (scores + bias).softmax(-1).to(v.dtype).view(num_kv * batch, group, length)
    out = torch.bmm(probs, v).view(num_kv, batch, group, head_dim)  # heads h = kv * group + g
    return out.permute(1, 0, 2, 3).reshape(batch, num_heads, head_dim)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
