"""The `logprobs` of /v1/completions (OpenAI's legacy dialect): parallel lists with one entry per
token; with `echo`, the prompt's tokens first, as OpenAI's legacy API and vLLM give them."""

from __future__ import annotations

from sagellm.api.error_shapes import generation_failed
from sagellm.api.protocol_openai import CompletionLogprobs
from sagellm.engine.events import FinishReason, PromptToken, TokenEvent


def empty() -> CompletionLogprobs:
    return CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])


def shown(ev: TokenEvent, echo: bool) -> bool:
    """Whether a generated token has an entry. Without echo, not the end-of-text token that ended
    the choice (the entries spell the text). With echo, every token the model read or made, special
    ones too, as vLLM lists them: scorers count entries (lm-eval's loglikelihood drops the last one
    as the generated token), so a missing one would shift every score silently."""
    if ev.token_id < 0:  # the end of a request that generated nothing (max_tokens 0)
        return False
    return echo or not (ev.special and ev.finish_reason == FinishReason.EOS_TOKEN)


def add_prompt(out: CompletionLogprobs, prompt: list[PromptToken] | None) -> None:
    """The prompt's entries; text_offset adds up the tokens' texts from 0, as vLLM does (for a
    prompt with special tokens or characters split across tokens it drifts from the echoed text,
    there as here). The first token has neither logprob nor alternatives: null. An engine that
    returned no prompt logprobs fails the request: scores without the prompt's entries would be
    silently wrong."""
    if prompt is None:
        raise generation_failed("the engine returned no prompt logprobs")
    offset = 0
    for i, t in enumerate(prompt):
        out.tokens.append(t.text)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({a.text: a.logprob for a in t.top_tokens} if i else None)
        out.text_offset.append(offset)
        offset += len(t.text)


def add_generated(out: CompletionLogprobs, events: list[TokenEvent], offset: int, echo: bool) -> int:
    """The generated tokens' entries; text_offset counts characters of the choice's text from
    `offset` (the echoed prompt's length). Returns the offset after them."""
    for ev in events:
        if not shown(ev, echo):
            continue
        out.tokens.append(ev.text)
        out.token_logprobs.append(ev.logprob)
        out.top_logprobs.append({t.text: t.logprob for t in ev.top_tokens})
        out.text_offset.append(offset)
        offset += len(ev.delta)
    return offset
