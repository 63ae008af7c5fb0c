"""What building any engine shares (sagellm.engine.builder for ours, sagellm.engine.vllm.build
for vLLM): the grammar compiler for the model's tokenizer, and the warm-up generation through the
finished EngineClient before /ping turns green."""

from __future__ import annotations

from sagellm.engine.client import EngineClient, Limits
from sagellm.engine.sampling_params import SamplingParams
from sagellm.settings import Settings


def grammar_compiler(settings: Settings, tokenizer, config, eos_token_ids: tuple[int, ...]):
    """The llguidance compiler for this tokenizer (sagellm.engine.constraint.GrammarCompiler), or
    None under DISABLE_GRAMMAR_SUPPORT."""
    if settings.disable_grammar_support:
        return None
    from sagellm.engine.constraint import GrammarCompiler

    return GrammarCompiler(tokenizer, _text_config(config).vocab_size, eos_token_ids,
                           timeout_s=settings.grammar_compile_timeout_s)


def vocab_size(tokenizer, config) -> int:
    """The token ids a request may name (prompt ids, logit_bias): below both the tokenizer's size and
    the embedding's (an id past the embedding would fail the whole batch's step)."""
    return min(len(tokenizer), _text_config(config).vocab_size)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def warm_up(client: EngineClient, chat) -> None:
    """One short generation through the whole path. chat: the model's ChatTemplate."""
    messages = [{"role": "user", "content": "Hello"}]
    prompt = client.encode_chat(client.render_chat(messages)) if chat.template else client.tokenize("Hello")
    events = list(client.submit(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True)))
    if not events or events[-1].finish_reason is None or events[-1].error:
        raise RuntimeError(f"warm-up generation failed: {events[-1].error if events else 'no output'}")


def describe_limits(lim: Limits) -> str:
    return (f"max_input_tokens={lim.max_input_tokens} max_total_tokens={lim.max_total_tokens} "
            f"max_batch_prefill_tokens={lim.max_batch_prefill_tokens} "
            f"max_batch_total_tokens={lim.max_batch_total_tokens} max_batch_size={lim.max_batch_size}")
