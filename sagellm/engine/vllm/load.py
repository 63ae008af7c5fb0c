"""ENGINE=vllm start-up: our side (model resolution, tokenizer, chat template, limits) as for
sagellm's engine, and vLLM's engine on the same folder. Returns what the runtime needs to build
the serving context: a LoadedModel-like description and the engine."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sagellm.engine.vllm.args import engine_args
from sagellm.engine.vllm.engine import VllmEngine
from sagellm.errors import ModelLoadError, SettingsError
from sagellm.model.chat_template import ChatTemplate, find_template
from sagellm.model.loader import Limits, _eos_ids, _load_error
from sagellm.model.resolve import ModelSource, resolve_model
from sagellm.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedFrontend:
    """What LoadedModel gives the serving context, without a torch model of our own."""

    tokenizer: object
    source: ModelSource
    device: str
    dtype: object  # torch.dtype vLLM runs in
    eos_token_ids: tuple[int, ...]
    chat: ChatTemplate
    limits: Limits
    served_name: str
    vocab_size: int
    load_seconds: float
    tp = None  # vLLM runs its own tensor-parallel workers

    def describe(self) -> list[str]:
        lim = self.limits
        return [
            f"model={self.source.model_id} ({self.source.kind}, {self.source.path}) engine=vllm",
            f"served_model_name={self.served_name} device={self.device} dtype={str(self.dtype)[6:]}",
            f"chat_template={self.chat.source} eos_token_ids={list(self.eos_token_ids)}",
            f"max_input_tokens={lim.max_input_tokens} max_total_tokens={lim.max_total_tokens} "
            f"max_batch_prefill_tokens={lim.max_batch_prefill_tokens} "
            f"max_batch_total_tokens={lim.max_batch_total_tokens} max_batch_size={lim.max_batch_size}",
            f"loaded in {self.load_seconds:.1f}s",
        ]


class _EosSource:
    """_eos_ids reads generation_config.eos_token_id from a model; here from the folder."""

    def __init__(self, path: str):
        from transformers import GenerationConfig

        try:
            self.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json
            self.generation_config = None


def _checkpoint_quantization(path: str) -> str | None:
    config = Path(path) / "config.json"
    try:
        q = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return q.get("quant_method")


def load_vllm(settings: Settings, device: str) -> tuple[LoadedFrontend, VllmEngine]:
    from transformers import AutoConfig, AutoTokenizer

    from sagellm.engine.distributed import check_degree

    t0 = time.monotonic()
    source = resolve_model(settings)
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=settings.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=settings.trust_remote_code)
    except Exception as exc:
        raise _load_error(source.path, exc) from exc
    prequantized = _checkpoint_quantization(source.path)
    if prequantized:
        log.info("the checkpoint is pre-quantized (%s); vLLM loads it so", prequantized)
    template, template_source = find_template(settings, tokenizer, source.path)
    chat = ChatTemplate(tokenizer, template, template_source, dict(settings.chat_template_kwargs))
    chat.self_test()
    world = check_degree(settings.num_shard, config, device)
    args, warnings = engine_args(settings, source.path, config, device, world)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    engine = VllmEngine(args, tokenizer, _eos_ids(_EosSource(source.path), tokenizer), text_config.vocab_size)
    try:
        engine.start()
        limits = _limits(settings, engine.limits())
    except Exception as exc:
        engine.stop(timeout=10)  # no vLLM process may outlive a failed start
        if isinstance(exc, (SettingsError, ModelLoadError)):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"vLLM could not start on {source.path}: {type(exc).__name__}: {first}") from exc
    for line in warnings:  # now, not before: gunicorn configures logging while vLLM starts
        log.warning("%s", line)
    frontend = LoadedFrontend(
        tokenizer=tokenizer, source=source, device=device, dtype=engine.dtype,
        eos_token_ids=engine.eos_token_ids, chat=chat, limits=limits,
        served_name=settings.served_model_name or source.model_id, vocab_size=text_config.vocab_size,
        load_seconds=time.monotonic() - t0)
    return frontend, engine


def _limits(settings: Settings, resolved: dict[str, int]) -> Limits:
    total = resolved["max_total_tokens"]
    max_input = settings.max_input_tokens if settings.max_input_tokens is not None else total - 1
    if max_input >= total:
        raise SettingsError(f"MAX_INPUT_TOKENS={max_input} must be less than vLLM's max_model_len={total} "
                            "(MAX_TOTAL_TOKENS)")
    return Limits(max_input, total, resolved["max_batch_prefill_tokens"], resolved["max_batch_total_tokens"],
                  resolved["max_batch_size"])
