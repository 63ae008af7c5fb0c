"""Loads the resolved model and tokenizer, and derives the token limits from the model and memory."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psutil
import torch

from sagellm.engine import attention
from sagellm.engine.kv_cache import PagedKVCache
from sagellm.errors import ModelLoadError, SettingsError
from sagellm.model import bundled, cpu_kernels, cpu_linear, fast_decoder
from sagellm.model.chat_template import ChatTemplate, find_template
from sagellm.model.resolve import ModelSource, resolve_model
from sagellm.settings import Settings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# On CPU the cache is allocated lazily, but keep the default within reason for a shared machine.
_CPU_MAX_KV_TOKENS = 131072


@dataclass(frozen=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int  # KV cache capacity, in tokens
    max_batch_size: int


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    tp: object | None  # sagellm.engine.distributed.TPGroup when SM_NUM_GPUS > 1
    device: str
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    chat: ChatTemplate
    limits: Limits
    served_name: str
    load_seconds: float

    @property
    def vocab_size(self) -> int:
        mc = self.model.config
        return (mc.get_text_config() if hasattr(mc, "get_text_config") else mc).vocab_size

    def describe(self) -> list[str]:
        lim = self.limits
        return [
            f"model={self.source.model_id} ({self.source.kind}, {self.source.path})"
            f" tensor_parallel={self.tp.world if self.tp else 1}",
            f"served_model_name={self.served_name} device={self.device} dtype={str(self.dtype)[6:]}",
            f"chat_template={self.chat.source} eos_token_ids={list(self.eos_token_ids)}",
            f"max_input_tokens={lim.max_input_tokens} max_total_tokens={lim.max_total_tokens} "
            f"max_batch_prefill_tokens={lim.max_batch_prefill_tokens} "
            f"max_batch_total_tokens={lim.max_batch_total_tokens} max_batch_size={lim.max_batch_size}",
            f"loaded in {self.load_seconds:.1f}s",
        ]


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(settings: Settings, device: str) -> torch.dtype:
    """bfloat16 unless told otherwise, on CPU too: measured on this project's 2-core machines,
    bf16 matmuls run 2-4x faster than fp32 (docs/performance.md)."""
    if settings.dtype:
        return _DTYPES[settings.dtype]
    return torch.bfloat16


def _load_error(path: str, exc: Exception) -> ModelLoadError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ModelLoadError(f"could not load the model from {path}: {type(exc).__name__}: {first}")


def load_weights(path: str, settings: Settings, device: str, tp_size: int = 1) -> torch.nn.Module:
    """The model on `device`, with our paged attention; with `tp_size` > 1, this rank's shard by
    transformers' TP plan (the process group must be up; every rank calls this together)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    attention.register()
    kwargs = dict(dtype=_dtype(settings, device), attn_implementation=attention.ATTN_IMPLEMENTATION,
                  trust_remote_code=settings.trust_remote_code)
    tp = tp_size > 1
    if tp:
        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=tp_size)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise _load_error(path, exc) from exc
    kernels = None
    if device == "cpu" and settings.cpu_kernels and model.dtype in cpu_kernels.DTYPES:
        kernels = cpu_kernels.load(bundled.default_cache_dir(settings.cache_dir))
    model.sagellm_kernels = kernels  # the runner hands them to the attention and the sampler
    if not tp:
        model.to(device)
        if fast_decoder.eligible(model):
            model.sagellm_fast = fast_decoder.FastDecoder(model, kernels)
        elif device == "cpu" and cpu_linear.available(model.dtype):
            cpu_linear.pack_linears(model)
    return model.eval()


def load_model(settings: Settings, device: str | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    from sagellm.engine.distributed import TPGroup, check_degree

    t0 = time.monotonic()
    device = device or pick_device()
    source = resolve_model(settings)
    if settings.quantize:
        raise ModelLoadError(f"HF_MODEL_QUANTIZE={settings.quantize} is not supported yet; "
                             "serve unquantized weights")
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=settings.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=settings.trust_remote_code)
    except Exception as exc:
        raise _load_error(source.path, exc) from exc
    world = check_degree(settings.num_shard, config, device)
    tp = TPGroup(world, device, source.path) if world > 1 else None
    try:
        model = load_weights(source.path, settings, "cuda:0" if device == "cuda" else device, tp_size=world)
    except BaseException:
        if tp is not None:
            tp.shutdown(timeout=1)
        raise
    template, template_source = find_template(settings, tokenizer, source.path)
    chat = ChatTemplate(tokenizer, template, template_source, dict(settings.chat_template_kwargs))
    chat.self_test()
    limits = derive_limits(settings, model.config, device, model.dtype, world)
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=source, tp=tp, device=device, dtype=model.dtype,
        eos_token_ids=_eos_ids(model, tokenizer), chat=chat, limits=limits,
        served_name=settings.served_model_name or source.model_id,
        load_seconds=time.monotonic() - t0)


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and v not in ids:
                ids.append(int(v))
    return tuple(ids)


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
