"""build_engine(settings): the one place the engine is built, from the model files to the
warmed-up EngineClient the server hands the API layer. ENGINE picks which (sagellm.engine.choice);
for ours: tensor-parallel ranks, the weights and what runs them (kernels, lean decoder), the
limits, the KV cache, the grammar compiler; vLLM's is built by sagellm.engine.vllm.build."""

from __future__ import annotations

import logging

from sagellm.engine.choice import choose_engine
from sagellm.engine.client import EngineClient, Limits, ModelInfo
from sagellm.engine.distributed import TPGroup, check_degree
from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.frontend import describe_limits, grammar_compiler, vocab_size, warm_up
from sagellm.engine.limits import derive_limits
from sagellm.engine.sagellm_client import SagellmEngineClient
from sagellm.model import quantization
from sagellm.model.loader import load_model, open_model, pick_device
from sagellm.settings import Settings

log = logging.getLogger("sagellm")

BLOCK_SIZE = 16  # tokens per KV cache block (and per prefix-cache entry)


def build_engine(settings: Settings, device: str | None = None) -> EngineClient:
    name, why = choose_engine(settings.engine)
    device = device or pick_device()
    if name == "vllm":
        from sagellm.engine.vllm.build import build_vllm

        client = build_vllm(settings, device)
    else:
        client = _build_sagellm(settings, device)
    # Logged once built: until gunicorn's post_worker_init has run, log lines may be lost.
    log.info("engine=%s (%s)", name, why)
    for line in settings.unhonoured(name):
        log.warning("%s", line)
    return client


def _build_sagellm(settings: Settings, device: str) -> EngineClient:
    files = open_model(settings)
    quantization.load_kwargs(settings, files.config)  # refused before any rank starts
    world = check_degree(settings.num_shard, files.config, device)
    # Followers start now: every rank loads its shard of the weights at the same time.
    tp = TPGroup(world, device, files.source.path) if world > 1 else None
    try:
        lm = load_model(settings, device, files, tp_size=world)
        limits = derive_limits(settings, lm.model.config, device, lm.dtype, world)
        for line in (lm.describe() + quantization.describe(files.config, str(lm.dtype)[6:])
                     + [f"tensor_parallel={world}", describe_limits(limits)]):
            log.info("%s", line)
        engine = LLMEngine(lm.model, lm.tokenizer, _engine_config(settings, limits), lm.eos_token_ids,
                           device=lm.device, tp_group=tp)
        engine.start()
        info = ModelInfo(model_id=lm.source.model_id, served_name=lm.served_name, device=lm.device,
                         dtype=str(lm.dtype).replace("torch.", ""),
                         vocab_size=vocab_size(lm.tokenizer, lm.model.config))
        client = SagellmEngineClient(engine, model=info, limits=limits, tokenizer=lm.tokenizer, chat=lm.chat,
                                     grammars=grammar_compiler(settings, lm.tokenizer, lm.model.config,
                                                               lm.eos_token_ids),
                                     watchdog_timeout_s=settings.watchdog_timeout_s, tp_group=tp)
        try:
            warm_up(client, lm.chat)
        except BaseException:
            engine.stop()
            raise
    except BaseException:
        if tp is not None:
            tp.shutdown(timeout=1)
        raise
    return client


def _engine_config(settings: Settings, limits: Limits) -> EngineConfig:
    return EngineConfig(max_batch_size=limits.max_batch_size, max_prefill_tokens=limits.max_batch_prefill_tokens,
                        max_total_tokens=limits.max_total_tokens,
                        num_kv_blocks=max(1, limits.max_batch_total_tokens // BLOCK_SIZE), block_size=BLOCK_SIZE,
                        prefix_caching=settings.prefix_caching)
