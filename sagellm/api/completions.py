"""/v1/completions (and /invocations bodies with a `prompt`): one or more prompts (texts or token
ids), `n` choices each, whole or streamed; stop strings are cut from the text, `stop_reason` names
the stop string or token that ended a choice, `logprobs` in the legacy dialect; `echo` puts the
prompt before the text and, with `logprobs`, its tokens' logprobs before the generated ones
(`max_tokens: 0` scores the prompt without generating: what evaluation tools send)."""

from __future__ import annotations

import dataclasses
import time
import uuid

from sagellm.api import legacy_logprobs
from sagellm.api.choices import FINGERPRINT, finish_reason, interleave
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import error_event, generation_failed, invalid, stream_failure
from sagellm.api.parse import parse
from sagellm.api.protocol import CompletionRequest
from sagellm.api.protocol_openai import Completion, CompletionChoice, Usage
from sagellm.api.responses import SSE_DONE, SSE_HEADERS, SSE_KEEPALIVE, JsonResponse, StreamResponse, sse
from sagellm.api.prompt_tokens import tokenize_bounded
from sagellm.api.sampling import check_n, openai_params
from sagellm.api.submit import collect, nth_params, submit_all
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.errors import GenerationError, SagellmError, ValidationError


def completions(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    req = parse(CompletionRequest, body)
    if req.suffix:
        raise invalid("`suffix` is not supported; add it to the prompt instead", "suffix")
    prompts = _prompt_ids(ctx, req.prompt)
    n = check_n(ctx, req.n)
    top_n = req.logprobs or 0  # legacy logprobs: an int, the alternatives per token
    if req.logprobs is not None and not 0 <= req.logprobs <= ctx.settings.max_top_n_tokens:
        raise invalid(f"`logprobs` must be >= 0 and <= {ctx.settings.max_top_n_tokens}. Given: {req.logprobs}",
                      "logprobs")
    if req.max_tokens == 0 and not req.echo:
        raise invalid("`max_tokens` must be strictly positive (0 only with `echo`, to score the prompt). "
                      "Given: 0", "max_tokens")
    score_prompt = bool(req.echo) and req.logprobs is not None
    jobs = []  # choice index = prompt index * n + j, as OpenAI numbers them
    echoed = []  # per choice: the prompt text it starts with
    for ids, text in prompts:
        params = openai_params(ctx, req, len(ids), "prompt", top_n, logprobs=req.logprobs is not None,
                               zero_ok=bool(req.echo))
        if score_prompt:
            params = dataclasses.replace(params, prompt_logprobs=True, prompt_top_n=top_n)
        jobs.extend((ids, nth_params(params, j)) for j in range(n))
        if req.echo and text is None:  # token ids come back as their text, special tokens kept
            text = ctx.engine.decode(ids, skip_special_tokens=False)
        echoed.extend([text if req.echo else ""] * n)
    n_prompt = sum(len(ids) for ids, _ in prompts)
    streams = submit_all(ctx, jobs)
    head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
                model=jobs[0][1].adapter or ctx.engine.model.served_name,
                system_fingerprint=FINGERPRINT)
    if req.stream:
        return StreamResponse(_stream(req, streams, echoed, head, n_prompt), dict(SSE_HEADERS))
    choices, n_out = [], 0
    try:
        for i, (stream, prefix) in enumerate(zip(streams, echoed)):
            events, finish = collect(stream)
            generated = [e for e in events if e.token_id >= 0]
            n_out += len(generated)
            lp = None
            if req.logprobs is not None:
                lp = legacy_logprobs.empty()
                if score_prompt:
                    legacy_logprobs.add_prompt(lp, events[0].prompt_logprobs)
                legacy_logprobs.add_generated(lp, generated, len(prefix), bool(req.echo))
            choices.append(CompletionChoice(
                index=i, text=prefix + "".join(e.delta for e in generated), logprobs=lp,
                finish_reason=finish_reason(finish), stop_reason=events[-1].stop_reason))
    finally:
        for stream in streams:
            stream.abort()
    return JsonResponse(Completion(**head, choices=choices, usage=Usage.of(n_prompt, n_out)))


def _prompt_ids(ctx: ServingContext, prompt) -> list[tuple[list[int], str | None]]:
    """(token ids, the text or None when given as ids) per prompt; a text, several, a list of
    ids or several such lists, as OpenAI's spec allows."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise invalid("`prompt` cannot be an empty list", "prompt")
    if len(prompt) > ctx.settings.max_client_batch_size:
        raise ValidationError(f"Number of prompts exceeds the maximum allowed batch size of "
                              f"{ctx.settings.max_client_batch_size} (MAX_CLIENT_BATCH_SIZE)", param="prompt")
    vocab = ctx.engine.model.vocab_size
    out = []
    for i, p in enumerate(prompt):
        if not p:
            raise invalid(f"`prompt` {i} cannot be empty", "prompt")
        if isinstance(p, str):
            out.append((tokenize_bounded(ctx, p, "prompt", ctx.engine.limits.max_input_tokens), p))
            continue
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:  # the embedding would fail the whole batch's step
            raise invalid(f"`prompt` token ids must be >= 0 and < {vocab} (the model's vocabulary). "
                          f"Given: {bad}", "prompt")
        out.append((list(p), None))
    return out


def _stream(req: CompletionRequest, streams, echoed: list[str], head: dict, n_prompt: int):
    """One chunk per token and choice; with echo, a choice's first chunk starts with its prompt
    (text and, with logprobs, entries), as vLLM streams it."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    echo = bool(req.echo)
    n_out = 0
    done = False
    started = [False] * len(streams)
    offsets = [0] * len(streams)
    try:
        for i, ev in interleave([s.iter_events(15.0) for s in streams], stream_failure):
            if ev is None:
                yield SSE_KEEPALIVE
                continue
            if isinstance(ev, SagellmError):  # the engine died or the drain cut the stream
                yield error_event(ev, "openai")
                break
            if isinstance(ev, SagellmError):
                yield error_event(ev, "openai")
                break
            if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
                yield error_event(generation_failed(ev.error), "openai")
                break
            n_out += ev.token_id >= 0
            finish = finish_reason(ev.finish_reason) if ev.finish_reason is not None else None
            text = ev.delta
            lp = legacy_logprobs.empty() if req.logprobs is not None else None
            if not started[i]:
                started[i] = True
                text = echoed[i] + text
                offsets[i] = len(echoed[i])
                if lp is not None and echo:
                    try:
                        legacy_logprobs.add_prompt(lp, ev.prompt_logprobs)
                    except GenerationError as exc:
                        yield error_event(exc, "openai")
                        break
            if lp is not None:
                offsets[i] = legacy_logprobs.add_generated(lp, [ev], offsets[i], echo)
                lp = lp if lp.tokens else None
            if text or finish or lp:
                choice = CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)
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
