"""/v1/completions (and /invocations bodies with a `prompt`): one or more prompts, `n` choices
each, whole or streamed; stop strings are cut from the text, `stop_reason` names the stop string
or token that ended a choice, `logprobs` in the legacy dialect."""

from __future__ import annotations

import time
import uuid

from sagellm.api.choices import FINGERPRINT, finish_reason, interleave
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import error_event, generation_failed, invalid
from sagellm.api.parse import parse
from sagellm.api.protocol import CompletionRequest
from sagellm.api.protocol_openai import Completion, CompletionChoice, CompletionLogprobs, Usage
from sagellm.api.responses import SSE_DONE, SSE_HEADERS, SSE_KEEPALIVE, JsonResponse, StreamResponse, sse
from sagellm.api.sampling import check_n, openai_params
from sagellm.api.submit import collect, nth_params, submit_all
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.errors import ValidationError


def completions(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    req = parse(CompletionRequest, body)
    if req.suffix:
        raise invalid("`suffix` is not supported; add it to the prompt instead", "suffix")
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise invalid("`prompt` cannot be an empty list", "prompt")
    if len(prompts) > ctx.settings.max_client_batch_size:
        raise ValidationError(f"Number of prompts exceeds the maximum allowed batch size of "
                              f"{ctx.settings.max_client_batch_size} (MAX_CLIENT_BATCH_SIZE)", param="prompt")
    n = check_n(ctx, req.n)
    top_n = req.logprobs or 0  # legacy logprobs: an int, the alternatives per token
    if req.logprobs is not None and not 0 <= req.logprobs <= ctx.settings.max_top_n_tokens:
        raise invalid(f"`logprobs` must be >= 0 and <= {ctx.settings.max_top_n_tokens}. Given: {req.logprobs}",
                      "logprobs")
    jobs = []  # choice index = prompt index * n + j, as OpenAI numbers them
    texts = []
    n_prompt = 0
    for i, text in enumerate(prompts):
        if not text:
            raise invalid(f"`prompt` {i} cannot be empty", "prompt")
        ids = ctx.engine.tokenize(text)
        n_prompt += len(ids)
        params = openai_params(ctx, req, len(ids), "prompt", top_n, logprobs=req.logprobs is not None)
        jobs.extend((ids, nth_params(params, j)) for j in range(n))
        texts.extend([text] * n)
    streams = submit_all(ctx, jobs)
    head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=ctx.engine.model.served_name,
                system_fingerprint=FINGERPRINT)
    if req.stream:
        return StreamResponse(_stream(req, streams, head, n_prompt), dict(SSE_HEADERS))
    choices, n_out = [], 0
    try:
        for i, (stream, text) in enumerate(zip(streams, texts)):
            events, finish = collect(stream)
            n_out += len(events)
            out_text = "".join(e.delta for e in events)
            choices.append(CompletionChoice(
                index=i, text=(text + out_text) if req.echo else out_text,
                logprobs=_legacy_logprobs(events, len(text) if req.echo else 0) if req.logprobs is not None else None,
                finish_reason=finish_reason(finish), stop_reason=events[-1].stop_reason))
    finally:
        for stream in streams:
            stream.abort()
    return JsonResponse(Completion(**head, choices=choices, usage=Usage.of(n_prompt, n_out)))


def _shown(ev: TokenEvent) -> bool:
    """Whether a token has a logprobs entry: all but the end-of-text token that ended a choice."""
    return not (ev.special and ev.finish_reason == FinishReason.EOS_TOKEN)


def _legacy_logprobs(events: list[TokenEvent], offset: int) -> CompletionLogprobs:
    """Parallel lists per token; text_offset counts characters of the choice's text (after the
    prompt when echo is on)."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for ev in filter(_shown, events):
        out.tokens.append(ev.text)
        out.token_logprobs.append(ev.logprob)
        out.top_logprobs.append({t.text: t.logprob for t in ev.top_tokens})
        out.text_offset.append(offset)
        offset += len(ev.delta)
    return out


def _error_event(exc: Exception) -> TokenEvent:
    return TokenEvent(0, -1, "", 0.0, True, "", [], FinishReason.ERROR, None, str(exc))


def _stream(req: CompletionRequest, streams, head: dict, n_prompt: int):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n_out = 0
    done = False
    offsets = [0] * len(streams)
    try:
        for i, ev in interleave([s.iter_events(15.0) for s in streams], _error_event):
            if ev is None:
                yield SSE_KEEPALIVE
                continue
            if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
                yield error_event(generation_failed(ev.error), "openai")
                break
            n_out += 1
            finish = finish_reason(ev.finish_reason) if ev.finish_reason is not None else None
            lp = None
            if req.logprobs is not None and _shown(ev):
                lp = _legacy_logprobs([ev], offsets[i])
                offsets[i] += len(ev.delta)
            if ev.delta or finish or lp:
                choice = CompletionChoice(index=i, text=ev.delta, logprobs=lp, finish_reason=finish)
                if finish:
                    choice.stop_reason = ev.stop_reason
                yield sse(Completion(**head, choices=[choice]))
        else:
            if include_usage:
                yield sse(Completion(**head, choices=[], usage=Usage.of(n_prompt, n_out)))
        yield SSE_DONE
        done = True
    finally:
        if not done:
            for stream in streams:
                stream.abort()
