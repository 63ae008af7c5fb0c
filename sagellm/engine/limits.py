"""The token limits in force: what the user left unset, derived from the model and the memory."""

from __future__ import annotations

import psutil
import torch

from sagellm.engine.client import Limits
from sagellm.engine.kv_cache import PagedKVCache
from sagellm.errors import SettingsError
from sagellm.settings import Settings

# On CPU the cache is allocated lazily, but keep the default within reason for a shared machine.
_CPU_MAX_KV_TOKENS = 131072


def derive_limits(settings: Settings, config, device: str, dtype: torch.dtype, world: int = 1) -> Limits:
    """Fill what the user left unset from the model and the memory; refuse impossible mixes
    with a message naming the variables."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_pos = getattr(cfg, "max_position_embeddings", None) or 4096
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    # Each rank holds its share of the KV heads.
    per_token = PagedKVCache.bytes_per_token(cfg.num_hidden_layers, max(kv_heads // world, 1), head_dim, dtype)

    if settings.max_batch_total_tokens:
        kv_tokens = settings.max_batch_total_tokens
    else:
        if settings.kv_cache_memory_mb:
            budget = settings.kv_cache_memory_mb * 2**20
        elif device == "cuda":
            budget = torch.cuda.mem_get_info()[0] * settings.cuda_memory_fraction
        else:
            budget = psutil.virtual_memory().available * settings.cuda_memory_fraction * 0.5
        kv_tokens = int(budget // per_token)
        if device != "cuda" and not settings.kv_cache_memory_mb:
            kv_tokens = min(kv_tokens, _CPU_MAX_KV_TOKENS)

    total = settings.max_total_tokens
    if total is None:
        total = min(max_pos, kv_tokens)
        if settings.max_input_tokens is not None:
            total = max(total, min(settings.max_input_tokens + 1, max_pos))
    if total > max_pos:
        raise SettingsError(f"MAX_TOTAL_TOKENS={total} exceeds the model's context "
                            f"(max_position_embeddings={max_pos}); use at most {max_pos}")
    max_input = settings.max_input_tokens if settings.max_input_tokens is not None else total - 1
    if max_input >= total:
        raise SettingsError(f"MAX_INPUT_TOKENS={max_input} must be less than MAX_TOTAL_TOKENS={total}")
    if kv_tokens < total:
        raise SettingsError(
            f"the KV cache holds {kv_tokens} tokens (MAX_BATCH_TOTAL_TOKENS / KV_CACHE_MEMORY_MB / "
            f"CUDA_MEMORY_FRACTION), fewer than MAX_TOTAL_TOKENS={total}; lower MAX_TOTAL_TOKENS "
            f"or give the cache more memory")
    prefill = settings.max_batch_prefill_tokens or (4096 if device == "cuda" else 512)
    batch_size = settings.max_batch_size or min(settings.max_concurrent_requests, 256)
    return Limits(max_input, total, prefill, kv_tokens, batch_size)
