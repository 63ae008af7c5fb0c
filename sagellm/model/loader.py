"""Loads the resolved model: its config and tokenizer, the weights with our paged attention and
what runs them (a ModelForward), the chat template and the EOS ids."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import torch

from sagellm.errors import ModelLoadError
from sagellm.model import attention, bundled, cpu_kernels, cpu_linear, fast_decoder, lora_step, probe, quantization
from sagellm.model import lora as lora_mod
from sagellm.model.chat_template import ChatTemplate, find_template
from sagellm.model.forward import ModelForward
from sagellm.model.resolve import ModelSource, resolve_model
from sagellm.settings import Settings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelFiles:
    """What is read before the weights (the tensor-parallel degree depends on the config)."""

    source: ModelSource
    config: object  # transformers' PretrainedConfig
    tokenizer: object


@dataclass
class LoadedModel:
    model: ModelForward
    tokenizer: object
    source: ModelSource
    device: str
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    chat: ChatTemplate
    served_name: str
    load_seconds: float

    @property
    def vocab_size(self) -> int:
        mc = self.model.config
        return (mc.get_text_config() if hasattr(mc, "get_text_config") else mc).vocab_size

    def describe(self) -> list[str]:
        return [
            f"model={self.source.model_id} ({self.source.kind}, {self.source.path})",
            f"served_model_name={self.served_name} device={self.device} dtype={str(self.dtype)[6:]}",
            f"chat_template={self.chat.source} eos_token_ids={list(self.eos_token_ids)}",
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


def load_error(path: str, exc: Exception) -> ModelLoadError:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ModelLoadError(f"could not load the model from {path}: {type(exc).__name__}: {first}")


def load_weights(path: str, settings: Settings, device: str, tp_size: int = 1, lora: bool = False) -> ModelForward:
    """The model on `device` with our paged attention, and what runs it; with `tp_size` > 1, this
    rank's shard by transformers' TP plan (the process group must be up; every rank calls this
    together). A model using an attention feature the engine does not implement is refused
    (sagellm.model.probe). lora: serve LoRA adapters (sagellm.model.lora_step), one rank only."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    attention.register()
    kwargs = dict(dtype=_dtype(settings, device), attn_implementation=attention.ATTN_IMPLEMENTATION,
                  trust_remote_code=settings.trust_remote_code, **quantization.load_kwargs(settings, path))
    tp = tp_size > 1
    if tp:
        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=tp_size)
    try:
        with warnings.catch_warnings():  # "loading attributes will be overwritten": that is the point
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise load_error(path, exc) from exc
    kernels = fast = None
    if device == "cpu" and settings.cpu_kernels and model.dtype in cpu_kernels.DTYPES:
        kernels = cpu_kernels.load(bundled.default_cache_dir(settings.cache_dir))
    if not tp:
        model.to(device)
    model.eval()
    layer_attention = probe.check(model, kernels, device, tp_size)  # every rank, together (collectives)
    if not tp:
        if fast_decoder.eligible(model):
            fast = fast_decoder.FastDecoder(model, kernels, layer_attention, settings.batch_invariant)
        elif device == "cpu" and cpu_linear.available(model.dtype):
            cpu_linear.pack_linears(model, 8 if settings.batch_invariant else 1,
                                    cpu_linear.rows_kernel(kernels, model, sole=settings.batch_invariant))
    if settings.batch_invariant and (fast is None or kernels is None):
        # Checked (tests/engine/test_batch_invariance.py) only with the lean decoder and the CPU
        # kernels: elsewhere the rotary angles, the decode attention's padding or the all-reduce
        # may still depend on the batch.
        log.warning("BATCH_INVARIANT=true: only the lean decoder on one rank with CPU kernels is batch "
                    "invariant; this model's greedy answers may still depend on the batch")
    slot = None
    if lora:
        if lora_mod.decoder_layers(model) is None:
            raise ModelLoadError(f"LoRA adapters: {type(model).__name__} has no decoder layer list to apply them to")
        if fast is None:  # the lean decoder applies them itself
            slot = lora_step.LoraSlot()
            lora_step.wrap_linears(model, slot)
    return ModelForward(model, kernels, fast, slot, settings.batch_invariant)


def open_model(settings: Settings) -> ModelFiles:
    """Resolve the model (downloading it if it is a hub id) and read its config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_model(settings)
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=settings.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=settings.trust_remote_code)
    except Exception as exc:
        raise load_error(source.path, exc) from exc
    return ModelFiles(source, config, tokenizer)


def load_model(settings: Settings, device: str | None = None, files: ModelFiles | None = None,
               tp_size: int = 1, lora: bool = False) -> LoadedModel:
    """Everything rank 0 serves from; with `tp_size` > 1 the follower ranks load their shards
    at the same time (sagellm.engine.distributed)."""
    t0 = time.monotonic()
    device = device or pick_device()
    files = files or open_model(settings)
    source, tokenizer = files.source, files.tokenizer
    model = load_weights(source.path, settings, "cuda:0" if device == "cuda" else device, tp_size=tp_size,
                         lora=lora)
    template, template_source = find_template(settings, tokenizer, source.path)
    chat = ChatTemplate(tokenizer, template, template_source, dict(settings.chat_template_kwargs))
    chat.self_test()
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=source, device=device, dtype=model.dtype,
        eos_token_ids=eos_token_ids(getattr(model.module, "generation_config", None), tokenizer), chat=chat,
        served_name=settings.served_model_name or source.model_id,
        load_seconds=time.monotonic() - t0)


def eos_token_ids(generation_config, tokenizer) -> tuple[int, ...]:
    """generation_config's EOS ids (it may list several), then the tokenizer's."""
    ids: list[int] = []
    gen = generation_config
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and v not in ids:
                ids.append(int(v))
    return tuple(ids)
