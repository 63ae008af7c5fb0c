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
    decode_slots: torch.Tensor | None  # [B_decode, L_max] flat slots of each context (0-padded)
    decode_mask: torch.Tensor | None  # [B_decode, 1, 1, L_max] bool, False on padding
    prefills: list[PrefillChunk]


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query: [1, H, T, D]; key, value: [1, KVH, T, D] for the T packed new tokens.
    meta: StepMetadata = kwargs["sagellm_meta"]
    k_cache = meta.cache.keys[module.layer_idx]  # [S, KVH, D]
    v_cache = meta.cache.values[module.layer_idx]
    k_new = key[0].transpose(0, 1)  # [T, KVH, D]
    v_new = value[0].transpose(0, 1)
    k_cache.index_copy_(0, meta.slot_mapping, k_new.to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, v_new.to(v_cache.dtype))

    outputs = []
    nd = meta.num_decode
    if nd:
        q = query[0, :, :nd].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
        k = k_cache[meta.decode_slots].permute(0, 2, 1, 3)  # [B, KVH, L, D]
        v = v_cache[meta.decode_slots].permute(0, 2, 1, 3)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask, scale=scaling,
                                           enable_gqa=True)  # [B, H, 1, D]
        outputs.append(o.squeeze(2))  # [B, H, D]
    for chunk in meta.prefills:
        sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        q = query[:, :, sl]  # [1, H, t, D]
        if chunk.ctx_len == 0:
            o = F.scaled_dot_product_attention(q, key[:, :, sl], value[:, :, sl], is_causal=True,
                                               scale=scaling, enable_gqa=True)
        else:
            k = k_cache[chunk.slots].transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx + t, D]
            v = v_cache[chunk.slots].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk.mask, scale=scaling,
                                               enable_gqa=True)
        outputs.append(o[0].transpose(0, 1))  # [t, H, D]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return out.unsqueeze(0), None  # [1, T, H, D]


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
