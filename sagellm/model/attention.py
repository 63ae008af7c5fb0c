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
    # takes the blocked path over contiguous keys, so a query's arithmetic is the same however its
    # prompt was split into chunks.
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
    if meta.last_rows is not None and not flash:  # last_rows_only's chunks are the flash kernel's
        raise UnsupportedAttention("a step trimmed to its last rows outside the flash kernel's path")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    nd = meta.num_decode
    if nd:
        outputs.append(_decode_attention(query[0, :, :nd], k_cache, v_cache, meta, scaling, window, softcap, s_aux))
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
            o = _blocked_prefill_attention(q[0], k[0], v[0], ctx - lo, scaling, meta.kernels, window, softcap, s_aux)
            outputs.append(o.transpose(0, 1))
            continue
        if ctx == 0 and (not window or chunk.q_len <= window):  # the window cuts nothing off
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            mask = chunk.mask if not window else _prefill_window_mask(meta, i, chunk, lo, window)
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
    AVX512-BF16, head_dim a multiple of 64, no window, softcap or sinks, and not BATCH_INVARIANT
    (whose one prefill path is the blocked one). Measured on this project's Zen 4 machines: a
    2,000-token prompt's attention 27 -> 19 ms a layer (docs/performance.md, "Prefill")."""
    return (meta.kernels is not None and bool(meta.prefills) and not meta.batch_invariant and not window
            and not softcap and s_aux is None and query.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16
            and query.shape[-1] % 64 == 0 and query.device.type == "cpu" and cpu_kernels.has_bf16_dot())


def _prefill_window_mask(meta: StepMetadata, i: int, chunk: PrefillChunk, lo: int, window: int) -> torch.Tensor:
    """[t, ctx - lo + t] bool: query j (position ctx + j) sees key position p (>= lo) when
    ctx + j - window < p <= ctx + j."""
    key = ("prefill", i, window)
    if key not in meta.window_masks:
        dev = meta.slot_mapping.device
        qpos = chunk.ctx_len + torch.arange(chunk.q_len, device=dev)[:, None]
        kpos = torch.arange(lo, chunk.ctx_len + chunk.q_len, device=dev)[None, :]
        meta.window_masks[key] = (kpos <= qpos) & (kpos > qpos - window)
    return meta.window_masks[key]


# Prefill chunks of at least this many tokens use _blocked_prefill_attention; shorter ones SDPA.
BLOCKED_PREFILL_MIN_TOKENS = 64
QUERY_BLOCK = 64


def _blocked_prefill_attention(q, k, v, ctx_len: int, scaling, kernels=None, window: int = 0,
                               softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a chunk's t queries (positions ctx_len ..) over ctx_len + t keys, as
    grouped matmuls over blocks of 64 queries: each block reads only the keys it can see (with a
    sliding window, only the last `window` before each query) and its fp32 scores stay
    cache-sized. q: [H, t, D]; k, v: [KVH, ctx_len + t, D]; sinks: [H] -> [H, t, D].

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
    for s in range(0, t, QUERY_BLOCK):
        e = min(t, s + QUERY_BLOCK)
        lo = max(0, ctx_len + s + 1 - window) if window else 0  # the first key the block's first query sees
        n, keys = e - s, ctx_len + e - lo
        qs = qg[:, :, s:e].reshape(num_kv, group * n, head_dim)
        scores = torch.bmm(qs, k[:, lo:ctx_len + e].transpose(1, 2))  # [KVH, G * n, keys]
        # Query s + i sees keys up to ctx_len + s + i (relative to lo: ctx_len + s - lo + i).
        if kernels is not None:  # one pass instead of five
            if window or softcap or sinks is not None:
                probs = kernels.causal_softmax(scores, scale, n, ctx_len + s - lo, window, softcap, sinks)
            else:
                probs = kernels.causal_softmax(scores, scale, n, ctx_len + s)
        else:
            probs = _masked_softmax(scores.view(num_kv, group, n, keys), scale, ctx_len + s - lo, window, softcap,
                                    sinks).to(v.dtype).view(num_kv, group * n, keys)
        outs.append(torch.bmm(probs, v[:, lo:ctx_len + e]).view(num_kv, group, n, head_dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.view(num_heads, t, head_dim)


def _masked_softmax(scores, scale: float, first: int, window: int, softcap: float, sinks) -> torch.Tensor:
    """The torch operators the causal_softmax kernel replaces. scores: [KVH, G, n, keys]; query i
    sees keys up to first + i (and, with a window, from first + i + 1 - window) -> float32 probs."""
    kvh, group, n, keys = scores.shape
    scores = scores.float().mul_(scale)
    if softcap:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    if window:
        qpos = first + torch.arange(n, device=scores.device)[:, None]
        kpos = torch.arange(keys, device=scores.device)[None, :]
        scores.masked_fill_((kpos > qpos) | (kpos <= qpos - window), float("-inf"))
    else:  # only the block's own keys can be in a query's future
        future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu_(1)
        scores[..., first:first + n].masked_fill_(future, float("-inf"))
    if sinks is None:
        return scores.softmax(-1)
    sink = sinks.float().view(kvh, group, 1, 1).expand(kvh, group, n, 1)
    return torch.cat([scores, sink], dim=-1).softmax(-1)[..., :keys]


def kernel_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the fused decode kernel takes this shape (the kernels are only loaded for CPU
    models in float32 or bfloat16, sagellm.model.loader)."""
    group, rem = divmod(q.shape[0], k_cache.shape[0])
    return k_cache.dtype == q.dtype and q.shape[-1] in (64, 128) and rem == 0 and group <= 8


def _decode_attention(q, k_cache, v_cache, meta: StepMetadata, scaling, window: int = 0, softcap: float = 0.0,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence. q: [H, B, D]; sinks: [H] -> [B, H, D].

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
        if window or softcap or sinks is not None:
            return meta.kernels.paged_decode_attention(q.transpose(0, 1), k_cache, v_cache, meta.decode_blocks,
                                                       meta.decode_lens, bs, scale, window, softcap, sinks)
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
    bias = meta.decode_bias if not window else _decode_window_bias(meta, window)
    if softcap:
        scores = scores.float().mul_(scale).div_(softcap).tanh_().mul_(softcap).add_(bias.view(batch, 1, 1, length))
    else:
        # fp32 bias (0 or -inf) + scale * scores in one operator: the scores are promoted to fp32
        # exactly, so this equals converting, scaling and adding one by one. Softmax in fp32.
        scores = torch.add(bias.view(batch, 1, 1, length), scores, alpha=scale)
    if sinks is None:
        probs = scores.softmax(-1)
    else:
        sink = sinks.float().view(1, num_kv, group, 1).expand(batch, num_kv, group, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :length]
    probs = probs.to(v.dtype).reshape(batch * num_kv, group, length)
    return torch.bmm(probs, v).view(batch, num_heads, head_dim)


def _decode_window_bias(meta: StepMetadata, window: int) -> torch.Tensor:
    """meta.decode_bias with the keys before each sequence's window at -inf too."""
    key = ("decode", window)
    if key not in meta.window_masks:
        pos = torch.arange(meta.decode_bias.shape[-1], device=meta.decode_bias.device)
        early = pos[None, :] < (meta.decode_lens[:, None] - window)  # [B, L]
        meta.window_masks[key] = meta.decode_bias.masked_fill(early[:, None, None, :], float("-inf"))
    return meta.window_masks[key]


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
