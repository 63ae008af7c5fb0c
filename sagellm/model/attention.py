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
    decode_rows: torch.Tensor | None = None  # [B_decode * KVH * NB] rows of the [KVH * blocks, ...] cache view
    decode_lens: torch.Tensor | None = None  # [B_decode] int64 context lengths
    kernels: object = None  # torch.ops.sagellm (sagellm.model.cpu_kernels), or None


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query: [1, H, T, D]; key, value: [1, KVH, T, D] for the T packed new tokens.
    meta: StepMetadata = kwargs["sagellm_meta"]
    k_cache = meta.cache.keys[module.layer_idx]  # [KVH, S, D]
    v_cache = meta.cache.values[module.layer_idx]
    if not kwargs.get("sagellm_cache_written"):  # the fused rope_write_kv kernel stored them already
        k_cache.index_copy_(1, meta.slot_mapping, key[0].to(k_cache.dtype))
        v_cache.index_copy_(1, meta.slot_mapping, value[0].to(v_cache.dtype))

    outputs = []
    nd = meta.num_decode
    if nd:
        outputs.append(_decode_attention(query[0, :, :nd], k_cache, v_cache, meta, scaling))
    for chunk in meta.prefills:
        sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        q = query[:, :, sl]  # [1, H, t, D]
        if chunk.q_len >= BLOCKED_PREFILL_MIN_TOKENS:
            if chunk.ctx_len == 0:
                k, v = key[0, :, sl], value[0, :, sl]  # [KVH, t, D]
            else:
                k, v = k_cache[:, chunk.slots], v_cache[:, chunk.slots]  # [KVH, ctx + t, D]
            outputs.append(_blocked_prefill_attention(q[0], k, v, chunk.ctx_len, scaling, meta.kernels).transpose(0, 1))
            continue
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


# Prefill chunks of at least this many tokens use _blocked_prefill_attention; shorter ones SDPA.
BLOCKED_PREFILL_MIN_TOKENS = 64
_QUERY_BLOCK = 64


def _blocked_prefill_attention(q, k, v, ctx_len: int, scaling, kernels=None) -> torch.Tensor:
    """Causal attention of a chunk's t queries (positions ctx_len ..) over ctx_len + t keys, as
    grouped matmuls over blocks of 64 queries: each block reads only the keys it can see and
    its fp32 scores stay cache-sized. q: [H, t, D]; k, v: [KVH, ctx_len + t, D] -> [H, t, D].

    Measured on CPU in bf16 (docs/performance.md): 2-3x faster than SDPA's kernel for chunks of
    512 queries (512 queries over 2048 keys: 14.7 -> 6.9 ms a layer); SDPA stays faster for a
    few dozen queries.
    """
    num_heads, t, head_dim = q.shape
    num_kv = k.shape[0]
    group = num_heads // num_kv
    scale = scaling if scaling is not None else head_dim ** -0.5
    qg = q.view(num_kv, group, t, head_dim)  # heads h = kv * group + g
    outs = []
    for s in range(0, t, _QUERY_BLOCK):
        e = min(t, s + _QUERY_BLOCK)
        n, keys = e - s, ctx_len + e
        qs = qg[:, :, s:e].reshape(num_kv, group * n, head_dim)
        scores = torch.bmm(qs, k[:, :keys].transpose(1, 2))
        # Query s + i sees keys up to ctx_len + s + i: only the block's own keys need a mask.
        if kernels is not None:
            probs = kernels.causal_softmax(scores, scale, n, ctx_len + s)  # one pass instead of five
        else:
            scores = scores.float().mul_(scale).view(num_kv, group, n, keys)
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
            scores[..., ctx_len + s:].masked_fill_(future, float("-inf"))
            probs = scores.softmax(-1).to(v.dtype).view(num_kv, group * n, keys)
        outs.append(torch.bmm(probs, v[:, :keys]).view(num_kv, group, n, head_dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.view(num_heads, t, head_dim)


def kernel_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the fused decode kernel takes this shape (the kernels are only loaded for CPU
    models in float32 or bfloat16, sagellm.model.loader)."""
    group, rem = divmod(q.shape[0], k_cache.shape[0])
    return k_cache.dtype == q.dtype and q.shape[-1] in (64, 128) and rem == 0 and group <= 8


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
    if meta.kernels is not None and kernel_fits(q, k_cache) and meta.decode_lens is not None:
        scale = scaling if scaling is not None else head_dim ** -0.5
        return meta.kernels.paged_decode_attention(q.transpose(0, 1), k_cache, v_cache, meta.decode_blocks,
                                                   meta.decode_lens, bs, scale)
    length = meta.decode_blocks.shape[1] * bs
    if meta.decode_rows is None:  # computed by the first layer, reused by the rest
        heads = torch.arange(num_kv, device=q.device)
        rows = heads[None, :, None] * meta.cache.num_blocks + meta.decode_blocks[:, None, :]
        meta.decode_rows = rows.view(-1)  # sequence-major, then kv head, then block
    # Whole blocks of every (sequence, kv head), gathered along dim 0 so the copy runs in parallel
    # over rows: [B * KVH * NB, bs, D] -> one [L, D] context per (sequence, kv head). Sequence-major,
    # so the output is already [B, H, D].
    k = k_cache.view(-1, bs, head_dim).index_select(0, meta.decode_rows).view(batch * num_kv, length, head_dim)
    v = v_cache.view(-1, bs, head_dim).index_select(0, meta.decode_rows).view(batch * num_kv, length, head_dim)
    qg = q.transpose(0, 1).reshape(batch * num_kv, group, head_dim)  # heads h = kv * group + g
    scale = scaling if scaling is not None else head_dim ** -0.5
    scores = torch.bmm(qg, k.transpose(1, 2)).view(batch, num_kv, group, length)
    # fp32 bias (0 or -inf) + scale * scores in one operator: the scores are promoted to fp32
    # exactly, so this equals converting, scaling and adding one by one. Softmax in fp32.
    scores = torch.add(meta.decode_bias.view(batch, 1, 1, length), scores, alpha=scale)
    probs = scores.softmax(-1).to(v.dtype).view(batch * num_kv, group, length)
    return torch.bmm(probs, v).view(batch, num_heads, head_dim)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
