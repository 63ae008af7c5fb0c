"""build_engine(settings): the one place the engine is built, from the model files to the
warmed-up EngineClient the server hands the API layer: tensor-parallel ranks, the weights and
what runs them (kernels, lean decoder), the limits, the KV cache, the grammar compiler."""

from __future__ import annotations

import logging

from sagellm.engine.client import EngineClient, Limits, ModelInfo
from sagellm.engine.distributed import TPGroup, check_degree
from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.limits import derive_limits
from sagellm.engine.sagellm_client import SagellmEngineClient
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import SettingsError
from sagellm.model.loader import LoadedModel, load_model, open_model, pick_device
from sagellm.settings import Settings

log = logging.getLogger("sagellm")

BLOCK_SIZE = 16  # tokens per KV cache block (and per prefix-cache entry)


def build_engine(settings: Settings, device: str | None = None) -> EngineClient:
    device = device or pick_device()
    files = open_model(settings)
    world = check_degree(settings.num_shard, files.config, device)
    if settings.batch_invariant and world > 1:
        raise SettingsError("BATCH_INVARIANT=true needs one rank (NUM_SHARD=1): tensor-parallel "
                            "all-reduces add the shards in an order of their own")
    # Followers start now: every rank loads its shard of the weights at the same time.
    tp = TPGroup(world, device, files.source.path) if world > 1 else None
    try:
        lm = load_model(settings, device, files, tp_size=world)
        limits = derive_limits(settings, lm.model.config, device, lm.dtype, world)
        for line in lm.describe() + [f"tensor_parallel={world}", _describe(limits)]:
            log.info("%s", line)
        engine = LLMEngine(lm.model, lm.tokenizer, _engine_config(settings, limits), lm.eos_token_ids,
                           device=lm.device, tp_group=tp)
        engine.start()
        try:
            _warm_up(engine, lm)
        except BaseException:
            engine.stop()
            raise
    except BaseException:
        if tp is not None:
            tp.shutdown(timeout=1)
        raise
    info = ModelInfo(model_id=lm.source.model_id, served_name=lm.served_name, device=lm.device,
                     dtype=str(lm.dtype).replace("torch.", ""))
    return SagellmEngineClient(engine, model=info, limits=limits, tokenizer=lm.tokenizer, chat=lm.chat,
                               grammars=_grammars(settings, lm), watchdog_timeout_s=settings.watchdog_timeout_s,
                               tp_group=tp)


def _engine_config(settings: Settings, limits: Limits) -> EngineConfig:
    return EngineConfig(max_batch_size=limits.max_batch_size, max_prefill_tokens=limits.max_batch_prefill_tokens,
                        max_total_tokens=limits.max_total_tokens,
                        num_kv_blocks=max(1, limits.max_batch_total_tokens // BLOCK_SIZE), block_size=BLOCK_SIZE,
                        prefix_caching=settings.prefix_caching)


def _describe(lim: Limits) -> str:
    return (f"max_input_tokens={lim.max_input_tokens} max_total_tokens={lim.max_total_tokens} "
            f"max_batch_prefill_tokens={lim.max_batch_prefill_tokens} "
            f"max_batch_total_tokens={lim.max_batch_total_tokens} max_batch_size={lim.max_batch_size}")


def _grammars(settings: Settings, lm: LoadedModel):
    """The llguidance compiler for this tokenizer, or None under DISABLE_GRAMMAR_SUPPORT."""
    if settings.disable_grammar_support:
        return None
    from sagellm.engine.constraint import GrammarCompiler

    config = lm.model.config
    vocab = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
    return GrammarCompiler(lm.tokenizer, vocab, lm.eos_token_ids, timeout_s=settings.grammar_compile_timeout_s)


def _warm_up(engine: LLMEngine, lm: LoadedModel) -> None:
    """One short generation through the whole path before /ping turns green."""
    prompt = lm.chat.encode(lm.chat.render([{"role": "user", "content": "Hello"}])) if lm.chat.template \
        else lm.tokenizer("Hello").input_ids
    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True)))
    if not events or events[-1].finish_reason is None or events[-1].error:
        raise RuntimeError(f"warm-up generation failed: {events[-1].error if events else 'no output'}")
