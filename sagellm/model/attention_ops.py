"""The attention arithmetic sagellm.model.attention's paged_attention dispatches to: blocked
prefill over a chunk's visible keys, and one query per sequence over the paged cache, each on the
fused CPU kernels where they fit and on torch operators otherwise (the operators are also the
reference the kernels are tested against). Shapes per function.
"""

from __future__ import annotations

import torch

# StepMetadata and PrefillChunk in the annotations are sagellm.model.attention's, not imported:
# that module imports this one (tests/unit/test_layers.py: no import circles).


def prefill_window_mask(meta: StepMetadata, i: int, chunk: PrefillChunk, lo: int, window: int) -> torch.Tensor:
    """[t, ctx - lo + t] bool: query j (position ctx + j) sees key position p (>= lo) when
    ctx + j - window < p <= ctx + j."""
    key = ("prefill", i, window)
    if key not in meta.window_masks:
        dev = meta.slot_mapping.device
        qpos = chunk.ctx_len + torch.arange(chunk.q_len, device=dev)[:, None]
        kpos = torch.arange(lo, chunk.ctx_len + chunk.q_len, device=dev)[None, :]
        meta.window_masks[key] = (kpos <= qpos) & (kpos > qpos - window)
    return meta.window_masks[key]


# Prefill chunks of at least this many tokens use blocked_prefill_attention; shorter ones SDPA.
BLOCKED_PREFILL_MIN_TOKENS = 64
QUERY_BLOCK = 64


def blocked_prefill_attention(q, k, v, ctx_len: int, scaling, kernels=None, window: int = 0,
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


def decode_attention(q, k_cache, v_cache, meta: StepMetadata, scaling, window: int = 0, softcap: float = 0.0,
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
