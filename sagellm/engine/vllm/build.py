"""ENGINE=vllm start-up: our side (model resolution, tokenizer, chat template, grammar compiler)
as for sagellm's engine, vLLM's engine on the same folder, and the VllmEngineClient over both,
warmed up; no vLLM process outlives a start that fails."""

from __future__ import annotations

import logging
import time

from sagellm.engine.client import Limits, ModelInfo
from sagellm.engine.frontend import describe_limits, grammar_compiler, vocab_size, warm_up
from sagellm.engine.vllm import lora as vllm_lora
from sagellm.engine.vllm.args import engine_args
from sagellm.engine.vllm.client import VllmEngineClient
from sagellm.engine.vllm.engine import VllmEngine
from sagellm.errors import ModelLoadError, SagellmError, SettingsError
from sagellm.model.chat_template import ChatTemplate, find_template
from sagellm.model.loader import eos_token_ids, open_model
from sagellm.settings import Settings

log = logging.getLogger("sagellm")


def build_vllm(settings: Settings, device: str) -> VllmEngineClient:
    from transformers import GenerationConfig

    from sagellm.engine.distributed import check_degree

    t0 = time.monotonic()
    files = open_model(settings)
    source, config, tokenizer = files.source, files.config, files.tokenizer
    prequantized = (getattr(config, "quantization_config", None) or {})
    if prequantized:
        method = prequantized.get("quant_method") if isinstance(prequantized, dict) else prequantized.quant_method
        log.info("the checkpoint is pre-quantized (%s); vLLM loads it so", method)
    template, template_source = find_template(settings, tokenizer, source.path)
    chat = ChatTemplate(tokenizer, template, template_source, dict(settings.chat_template_kwargs))
    chat.self_test()
    world = check_degree(settings.num_shard, config, device)
    adapters = vllm_lora.configured(settings)
    lora_args, lora_lines = vllm_lora.engine_kwargs(settings) if adapters is not None else (None, [])
    served_name = settings.served_model_name or source.model_id
    registry = None if adapters is None else vllm_lora.registry(settings, config, source.model_id, served_name,
                                                                  adapters)
    args, warnings = engine_args(settings, source.path, config, device, world, lora_args)
    if registry is not None:
        vllm_lora.fit_slots(registry, args.max_loras)
    try:
        generation_config = GenerationConfig.from_pretrained(source.path)
    except OSError:  # no generation_config.json
        generation_config = None
    eos = eos_token_ids(generation_config, tokenizer)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    engine = VllmEngine(args, tokenizer, eos, text_config.vocab_size, adapters=registry)
    try:
        engine.start()
        limits = _limits(settings, engine.limits())
        info = ModelInfo(model_id=source.model_id, served_name=served_name,
                         device=device, dtype=str(engine.dtype).replace("torch.", ""),
                         vocab_size=vocab_size(tokenizer, config))
        client = VllmEngineClient(engine, model=info, limits=limits, tokenizer=tokenizer, chat=chat,
                                  grammars=grammar_compiler(settings, tokenizer, config, eos),
                                  watchdog_timeout_s=settings.watchdog_timeout_s)
        warm_up(client, chat)
    except Exception as exc:
        engine.stop(timeout=10)
        if isinstance(exc, SagellmError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"vLLM could not start on {source.path}: {type(exc).__name__}: {first}") from exc
    for line in warnings:  # now, not before: gunicorn configures logging while vLLM starts
        log.warning("%s", line)
    for line in (f"model={source.model_id} ({source.kind}, {source.path})",
                 f"served_model_name={info.served_name} device={device} dtype={info.dtype}",
                 f"chat_template={chat.source} eos_token_ids={list(eos)}",
                 f"tensor_parallel={world}", describe_limits(limits), *lora_lines,
                 f"loaded in {time.monotonic() - t0:.1f}s"):
        log.info("%s", line)
    return client


def _limits(settings: Settings, resolved: dict[str, int]) -> Limits:
    total = resolved["max_total_tokens"]
    max_input = settings.max_input_tokens if settings.max_input_tokens is not None else total - 1
    if max_input >= total:
        raise SettingsError(f"MAX_INPUT_TOKENS={max_input} must be less than vLLM's max_model_len={total} "
                            "(MAX_TOTAL_TOKENS)")
    return Limits(max_input, total, resolved["max_batch_prefill_tokens"], resolved["max_batch_total_tokens"],
                  resolved["max_batch_size"])
