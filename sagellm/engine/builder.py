"""build_engine(settings): the one place the engine is built, from the model files to the
warmed-up EngineClient the server hands the API layer. ENGINE picks which (sagellm.engine.choice);
for ours: tensor-parallel ranks, the weights and what runs them (kernels, lean decoder), the
limits, the KV cache, the grammar compiler; vLLM's is built by sagellm.engine.vllm.build."""

from __future__ import annotations

import logging

from sagellm.engine.adapters import AdapterRegistry, configured_registry
from sagellm.engine.choice import choose_engine
from sagellm.engine.client import EngineClient, Limits, ModelInfo
from sagellm.engine.distributed import TPGroup, check_degree
from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.frontend import describe_limits, grammar_compiler, vocab_size, warm_up
from sagellm.engine.limits import derive_limits
from sagellm.engine.scheduler import LONE_PREFILL_TOKENS
from sagellm.engine.sagellm_client import SagellmEngineClient
from sagellm.errors import ModelLoadError, SettingsError
from sagellm.model import lora as lora_mod
from sagellm.model import quantization
from sagellm.model.loader import LoadedModel, load_model, open_model, pick_device
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
    if settings.batch_invariant and world > 1:
        raise SettingsError("BATCH_INVARIANT=true needs one rank (NUM_SHARD=1): tensor-parallel "
                            "all-reduces add the shards in an order of their own")
    adapters = lora_mod.folder_adapters(settings.model_dir) + list(settings.lora_adapters)
    lora = bool(adapters) or settings.max_loras is not None
    if lora and world > 1:
        raise ModelLoadError(f"LoRA adapters are served on one rank only; SM_NUM_GPUS={settings.num_shard} asks for "
                             f"{world} (unset LORA_ADAPTERS / MAX_LORAS, or serve on one device)")
    # Followers start now: every rank loads its shard of the weights at the same time.
    tp = TPGroup(world, device, files.source.path) if world > 1 else None
    try:
        lm = load_model(settings, device, files, tp_size=world, lora=lora)
        registry = _adapters(settings, lm, adapters) if lora else None
        limits = derive_limits(settings, lm.model.config, device, lm.dtype, world)
        for line in (lm.describe() + quantization.describe(files.config, str(lm.dtype)[6:])
                     + [f"tensor_parallel={world}", describe_limits(limits)]):
            log.info("%s", line)
        engine = LLMEngine(lm.model, lm.tokenizer, _engine_config(settings, limits), lm.eos_token_ids,
                           device=lm.device, tp_group=tp, adapters=registry)
        engine.start()
        info = ModelInfo(model_id=lm.source.model_id, served_name=lm.served_name, device=lm.device,
                         dtype=str(lm.dtype).replace("torch.", ""),
                         vocab_size=vocab_size(lm.tokenizer, lm.model.config))
        client = SagellmEngineClient(engine, model=info, limits=limits, tokenizer=lm.tokenizer, chat=lm.chat,
                                     grammars=grammar_compiler(settings, lm.tokenizer, lm.model.config,
                                                               lm.eos_token_ids),
                                     watchdog_timeout_s=settings.watchdog_timeout_s, tp_group=tp, adapters=registry)
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


def _adapters(settings: Settings, lm: LoadedModel, adapters: list[tuple[str, str]]) -> AdapterRegistry:
    """The registry with every configured adapter read and checked (a bad one stops start-up with
    one line naming it); the first MAX_LORAS stay resident."""
    def read(name: str, folder: str):
        return lora_mod.read_adapter(name, folder, lm.model.module, settings.max_lora_rank,
                                     base_id=lm.source.model_id, dtype=lm.dtype, device=lm.device)

    return configured_registry(read, settings.max_loras, (lm.served_name, lm.source.model_id), adapters,
                               settings.model_dir, settings.hf_token)


def _engine_config(settings: Settings, limits: Limits) -> EngineConfig:
    return EngineConfig(max_batch_size=limits.max_batch_size, max_prefill_tokens=limits.max_batch_prefill_tokens,
                        max_total_tokens=limits.max_total_tokens,
                        num_kv_blocks=max(1, limits.max_batch_total_tokens // BLOCK_SIZE), block_size=BLOCK_SIZE,
                        prefix_caching=settings.prefix_caching,
                        # Only where the budget is derived: a budget set by the user is kept to.
                        lone_prefill_tokens=0 if settings.max_batch_prefill_tokens else LONE_PREFILL_TOKENS)
