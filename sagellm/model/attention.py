"""Attention over the paged KV cache for a packed step: decode tokens first, then prefill chunks.

Registered with transformers' AttentionInterface, so any model that routes attention through it
(Llama, Mistral, Qwen2, Gemma, ...) runs on our cache; the model's own q/k/v projections, RoPE and
tensor-parallel plan stay as transformers defines them. Besides causal softmax(q k^T * scaling) v
it implements what transformers hands an attention implementation for the families in the README:
a sliding window (`sliding_window`: key k is seen by query q when q - window < k <= q), attention
logit softcapping (`softcap`: scores <- tanh(scores / softcap) * softcap) and attention sinks
(`s_aux`: one more logit per head in the softmax, its probability dropped). Any other argument is
refused, never ignored (sagellm.model.probe checks this at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from sagellm.model import cpu_kernels
from sagellm.model.attention_ops import (BLOCKED_PREFILL_MIN_TOKENS, blocked_prefill_attention, decode_attention,
                                         prefill_window_mask)

ATTN_IMPLEMENTATION = "sagellm_paged"
# Arguments transformers passes along that carry nothing attention must apply: positions are
# already in q and k (RoPE), and the engine keeps its own cache.
IGNORED_ARGUMENTS = frozenset({"position_ids", "use_cache", "output_router_logits"})


class UnsupportedAttention(RuntimeError):
    """The model asked the attention for something it does not implement."""


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
    probe: object = None  # sagellm.model.probe.Probe during the start-up check: records every call
    # Masks derived per sliding window, built by the first layer that needs them, reused by the rest.
    window_masks: dict = field(default_factory=dict)
    # BATCH_INVARIANT: every prefill chunk (its start a multiple of QUERY_BLOCK, sagellm.engine.scheduler)
    # takes one path, the flash kernel where it fits (flash_fits), else the blocked path over
    # contiguous keys, so a query's arithmetic is the same however its prompt was split into chunks.
    batch_invariant: bool = False
    # last_rows_only: the queries are these first rows of the step (keep), the keys and values all.
    last_rows: int | None = None


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    softcap=None, s_aux=None, *, sagellm_meta: StepMetadata, sagellm_cache_written=False, **kwargs):
    # query: [1, H, T, D]; key, value: [1, KVH, T, D] for the T packed new tokens; s_aux: [H] sinks.
    meta = sagellm_meta
    if meta.probe is not None:
        meta.probe.record(module, query, key, attention_mask, dict(
            kwargs, scaling=scaling, dropout=dropout, sliding_window=sliding_window, softcap=softcap, s_aux=s_aux))
    elif attention_mask is not None or dropout or (kwargs and kwargs.keys() - IGNORED_ARGUMENTS):
        # Vetted by the probe at start-up; a model whose calls change afterwards fails its step.
        raise UnsupportedAttention(f"attention called with {sorted(kwargs.keys() - IGNORED_ARGUMENTS)}, "
                                   f"dropout={dropout}, a mask={attention_mask is not None}")
    window = sliding_window or 0
    softcap = softcap or 0.0
    k_cache = meta.cache.keys[module.layer_idx]  # [KVH, S, D]
    v_cache = meta.cache.values[module.layer_idx]
    if not sagellm_cache_written:  # the fused rope_write_kv kernel stored them already
        k_cache.index_copy_(1, meta.slot_mapping, key[0].to(k_cache.dtype))
        v_cache.index_copy_(1, meta.slot_mapping, value[0].to(v_cache.dtype))

    outputs = []
    flash = flash_fits(meta, query, k_cache, window, softcap, s_aux)
    # last_rows_only's chunks are the flash kernel's (none left where only decode rows are read).
    if meta.last_rows is not None and meta.prefills and not flash:
        raise UnsupportedAttention("a step trimmed to its last rows outside the flash kernel's path")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    nd = meta.num_decode
    if nd:
        outputs.append(decode_attention(query[0, :, :nd], k_cache, v_cache, meta, scaling, window, softcap, s_aux))
    for i, chunk in enumerate(meta.prefills):
        sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        q = query[:, :, sl]  # [1, H, t, D]
        ctx = chunk.ctx_len
        if flash:  # the context read in place through its slots: no gathered copy
            qt = q[0].transpose(0, 1)  # [t, H, D]
            outputs.append(meta.kernels.flash_prefill_attention(qt, key[0, :, sl], value[0, :, sl], 0, scale)
                           if ctx == 0 else
                           meta.kernels.flash_prefill_attention(qt, k_cache, v_cache, ctx, scale, chunk.slots))
            continue
        # Keys before `lo` are outside every query's window: not even gathered.
        lo = max(0, ctx + 1 - window) if window else 0
        if ctx == 0:
            k, v = key[:, :, sl], value[:, :, sl]  # [1, KVH, t, D]
            if meta.batch_invariant:  # laid out as the keys gathered from the cache are
                k, v = k.to(k_cache.dtype).contiguous(), v.to(v_cache.dtype).contiguous()
        else:
            k = k_cache[:, chunk.slots[lo:]].unsqueeze(0)  # [1, KVH, ctx - lo + t, D]
            v = v_cache[:, chunk.slots[lo:]].unsqueeze(0)
        if (chunk.q_len >= BLOCKED_PREFILL_MIN_TOKENS or softcap or s_aux is not None  # SDPA has neither
                or meta.batch_invariant):
            o = blocked_prefill_attention(q[0], k[0], v[0], ctx - lo, scaling, meta.kernels, window, softcap, s_aux)
            outputs.append(o.transpose(0, 1))
            continue
        if ctx == 0 and (not window or chunk.q_len <= window):  # the window cuts nothing off
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            mask = chunk.mask if not window else prefill_window_mask(meta, i, chunk, lo, window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        outputs.append(o[0].transpose(0, 1))  # [t, H, D]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
    return out.unsqueeze(0), None  # [1, T, H, D]


def last_rows_only(meta: StepMetadata, keep: list[int], query: torch.Tensor, layer_idx: int, arguments: dict
                   ) -> StepMetadata | None:
    """The step's metadata for the attention of the `keep` rows alone (the last layer, whose
    other rows are never read on), or None where that does not apply: each kept prefill row must
    be the last of its chunk (no prompt-logprob rows), every decode row kept, and the chunks those
    of the flash kernel's bf16 path (it reads a chunk's keys from the cache through its slots,
    whatever the number of queries). A chunk's last row becomes a one-query chunk whose context
    is the rest of the chunk; chunks with no row kept drop out. The new k/v of all the step's
    rows are still written to the cache (its slot_mapping is unchanged). query: [1, H, T, D];
    arguments: the layer's attention arguments (scaling, sliding_window, ...)."""
    if meta.probe is not None or not flash_fits(meta, query, meta.cache.keys[layer_idx], arguments.get("sliding_window")
                                                or 0, arguments.get("softcap") or 0.0, arguments.get("s_aux")):
        return None
    nd = meta.num_decode
    ends = {c.q_start + c.q_len - 1: c for c in meta.prefills}
    if keep[:nd] != list(range(nd)) or keep != sorted(set(keep)) or any(r not in ends for r in keep[nd:]):
        return None
    chunks = []
    for r in keep[nd:]:
        c = ends[r]
        slots = c.slots if c.ctx_len else meta.slot_mapping[c.q_start:c.q_start + c.q_len]
        chunks.append(PrefillChunk(nd + len(chunks), 1, c.ctx_len + c.q_len - 1, slots, None))
    if any(c.ctx_len == 0 for c in chunks):  # a one-token prompt: nothing to drop
        return None
    return replace(meta, prefills=chunks, window_masks={}, last_rows=len(keep))


def flash_fits(meta: StepMetadata, query: torch.Tensor, k_cache: torch.Tensor, window: int, softcap: float,
               s_aux) -> bool:
    """Whether prefill chunks take the flash_prefill_attention kernel: bf16 on a CPU with
    AVX512-BF16, head_dim a multiple of 64, no window, softcap or sinks. Measured on this
    project's Zen 4 machines: a 2,000-token prompt's attention 27 -> 19 ms a layer
    (docs/performance.md, "Prefill"). BATCH_INVARIANT takes it too: it is every chunk's one path
    there, and a query's result is the same however its prompt is split into chunks, or cut to its
    last row (tests/engine/test_prefill_attention.py)."""
    return (meta.kernels is not None and bool(meta.prefills) and not window
            and not softcap and s_aux is None and query.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16
            and query.shape[-1] % 64 == 0 and query.device.type == "cpu" and cpu_kernels.has_bf16_dot())


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
