"""build_engine(settings): the one place the engine is built, from the model to the warmed-up
EngineClient the server hands the API layer."""

from __future__ import annotations

import logging

from sagellm.engine.client import EngineClient, ModelInfo
from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.sagellm_client import SagellmEngineClient
from sagellm.engine.sampling_params import SamplingParams
from sagellm.settings import Settings

log = logging.getLogger("sagellm")

BLOCK_SIZE = 16  # tokens per KV cache block (and per prefix-cache entry)


def build_engine(settings: Settings) -> EngineClient:
    from sagellm.model import load_model

    lm = load_model(settings)
    for line in lm.describe():
        log.info("%s", line)
    lim = lm.limits
    cfg = EngineConfig(max_batch_size=lim.max_batch_size, max_prefill_tokens=lim.max_batch_prefill_tokens,
                       max_total_tokens=lim.max_total_tokens,
                       num_kv_blocks=max(1, lim.max_batch_total_tokens // BLOCK_SIZE), block_size=BLOCK_SIZE,
                       prefix_caching=settings.prefix_caching)
    engine = LLMEngine(lm.model, lm.tokenizer, cfg, lm.eos_token_ids, device=lm.device, tp_group=lm.tp)
    engine.start()
    try:
        _warm_up(engine, lm)
    except BaseException:
        engine.stop()
        raise
    grammars = None
    if not settings.disable_grammar_support:
        from sagellm.engine.constraint import GrammarCompiler

        mc = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
        grammars = GrammarCompiler(lm.tokenizer, mc.vocab_size, lm.eos_token_ids,
                                   timeout_s=settings.grammar_compile_timeout_s)
    info = ModelInfo(model_id=lm.source.model_id, served_name=lm.served_name, device=lm.device,
                     dtype=str(lm.dtype).replace("torch.", ""))
    return SagellmEngineClient(engine, model=info, limits=lim, tokenizer=lm.tokenizer, chat=lm.chat,
                               grammars=grammars, watchdog_timeout_s=settings.watchdog_timeout_s, tp_group=lm.tp)


def _warm_up(engine: LLMEngine, lm) -> None:
    """One short generation through the whole path before /ping turns green."""
    prompt = lm.chat.encode(lm.chat.render([{"role": "user", "content": "Hello"}])) if lm.chat.template \
        else lm.tokenizer("Hello").input_ids
    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True)))
    if not events or events[-1].finish_reason is None or events[-1].error:
        raise RuntimeError(f"warm-up generation failed: {events[-1].error if events else 'no output'}")
