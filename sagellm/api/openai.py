"""The OpenAI API: /v1/completions and /v1/models (and /invocations bodies of that shape), and
what chat.py (/v1/chat/completions) shares with them: request fields -> SamplingParams, choices,
usage, interleaving several choices' streams. finish_reason is "stop", "length" or (chat)
"tool_calls"; stop strings are cut from the text; `stop_reason` names the stop string or token
that ended a choice."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import uuid

from sagellm import __version__
from sagellm.api.context import ServingContext
from sagellm.api.parse import parse
from sagellm.api.protocol import CompletionRequest, _OpenAISampling
from sagellm.api.responses import SSE_DONE, SSE_HEADERS, JsonResponse, StreamResponse, sse
from sagellm.api.sampling import build_params, check_common, invalid, resolve_max_new
from sagellm.api.tgi import collect
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import ValidationError

FINGERPRINT = f"sagellm-{__version__}"


def finish_reason(reason: FinishReason) -> str:
    return "length" if reason == FinishReason.LENGTH else "stop"


def _stops(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def openai_params(ctx: ServingContext, req: _OpenAISampling, prompt_len: int, inputs_name: str,
              top_n: int = 0, logprobs: bool = False):
    stop = _stops(req.stop)
    requested = next((v for v in (req.max_completion_tokens, req.max_tokens, req.max_new_tokens)
                      if v is not None), None)
    name = ("max_completion_tokens" if req.max_completion_tokens is not None else
            "max_tokens" if req.max_tokens is not None else "max_new_tokens")
    check_common(ctx, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, typical_p=None,
                 repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                 presence_penalty=req.presence_penalty, stop=stop, seed=req.seed, max_new_name=name,
                 max_new_tokens=requested, min_p=req.min_p)
    if req.min_tokens is not None and req.min_tokens < 0:
        raise invalid(f"`min_tokens` must be >= 0. Given: {req.min_tokens}", "min_tokens")
    bias = []
    for key, value in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < 2**31:
            raise invalid(f"`logit_bias` keys must be token ids. Given: {key!r}", "logit_bias")
        if not -100 <= value <= 100:
            raise invalid(f"`logit_bias` values must be >= -100 and <= 100. Given: {value}", "logit_bias")
        bias.append((int(key), float(value)))
    max_new = resolve_max_new(ctx, prompt_len, requested, inputs_name=inputs_name, max_new_name=name)
    return build_params(ctx, max_new_tokens=max_new, do_sample=req.temperature != 0,
                        temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                        repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                        presence_penalty=req.presence_penalty, stop=stop, seed=req.seed, logit_bias=bias,
                        min_new_tokens=req.min_tokens, ignore_eos=req.ignore_eos, top_n_tokens=top_n,
                        logprobs=logprobs)


def check_n(ctx: ServingContext, req) -> int:
    if req.n is not None and not 1 <= req.n <= ctx.settings.max_choices:
        raise invalid(f"`n` must be >= 1 and <= {ctx.settings.max_choices}. Given: {req.n}"
                      " (MAX_CHOICES)", "n")
    return req.n or 1


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: its own seed (seed + index), so choices differ but reproduce."""
    if index and params.do_sample and params.seed is not None:
        return dataclasses.replace(params, seed=(params.seed + index) % 2**64)
    return params


def interleave(sources, on_error):
    """(index, item) from several iterators, in the order the items come. Each runs, and is
    closed, in its own thread; an exception becomes the item `on_error(exc)`."""
    if len(sources) == 1:
        try:
            for item in sources[0]:
                yield 0, item
        except Exception as exc:
            yield 0, on_error(exc)
        finally:
            if hasattr(sources[0], "close"):
                sources[0].close()
        return
    q: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def pump(i, source):
        try:
            for item in source:
                if stop.is_set():
                    break
                q.put((i, item))
        except Exception as exc:  # engine died: surface it in the stream
            q.put((i, on_error(exc)))
        finally:
            if hasattr(source, "close"):
                source.close()
            q.put((i, StopIteration))

    for i, source in enumerate(sources):
        threading.Thread(target=pump, args=(i, source), daemon=True).start()
    open_ = len(sources)
    try:
        while open_:
            i, item = q.get()
            if item is StopIteration:
                open_ -= 1
                continue
            yield i, item
    finally:
        stop.set()


# ---- completions ----

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
    n = check_n(ctx, req)
    top_n = req.logprobs or 0  # legacy logprobs: an int, the alternatives per token
    if req.logprobs is not None and not 0 <= req.logprobs <= ctx.settings.max_top_n_tokens:
        raise invalid(f"`logprobs` must be >= 0 and <= {ctx.settings.max_top_n_tokens}. Given: {req.logprobs}",
                      "logprobs")
    jobs = []  # choice index = prompt index * n + j, as OpenAI numbers them
    n_prompt = 0
    for i, text in enumerate(prompts):
        if not text:
            raise invalid(f"`prompt` {i} cannot be empty", "prompt")
        ids = ctx.tokenize(text, True)
        n_prompt += len(ids)
        params = openai_params(ctx, req, len(ids), "prompt", top_n, logprobs=req.logprobs is not None)
        jobs.extend((text, ids, choice_params(params, j)) for j in range(n))
    handles = []
    try:
        for _, ids, params in jobs:
            handles.append(ctx.submit(ids, params))
    except BaseException:
        for h in handles:
            h.abort()
        raise
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": cid, "object": "text_completion", "created": created, "model": ctx.served_name,
            "system_fingerprint": FINGERPRINT}
    if req.stream:
        return StreamResponse(_completion_stream(req, handles, base, n_prompt), dict(SSE_HEADERS))
    choices, n_out = [], 0
    try:
        for i, (handle, (text, _, _)) in enumerate(zip(handles, jobs)):
            events, finish = collect(handle)
            n_out += len(events)
            out_text = "".join(e.delta for e in events)
            start = len(text) if req.echo else 0
            choices.append({"index": i, "text": (text + out_text) if req.echo else out_text,
                            "logprobs": _legacy_logprobs(events, start) if req.logprobs is not None else None,
                            "finish_reason": finish_reason(finish), "stop_reason": events[-1].stop_reason})
    finally:
        for h in handles:
            h.abort()
    return JsonResponse({**base, "choices": choices, "usage": usage(n_prompt, n_out)})


def _legacy_logprobs(events: list[TokenEvent], offset: int) -> dict:
    """The completions API's logprobs: parallel lists per token; text_offset counts characters
    of the choice's text (after the prompt when echo is on)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ev in events:
        if ev.special and ev.finish_reason == FinishReason.EOS_TOKEN:
            continue
        out["tokens"].append(ev.text)
        out["token_logprobs"].append(ev.logprob)
        out["top_logprobs"].append({t.text: t.logprob for t in ev.top_tokens})
        out["text_offset"].append(offset)
        offset += len(ev.delta)
    return out


def _error_event(exc: Exception) -> TokenEvent:
    return TokenEvent(0, -1, "", 0.0, True, "", [], FinishReason.ERROR, None, str(exc))


def _completion_stream(req, handles, base, n_prompt):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n_out = 0
    done = False
    offsets = [0] * len(handles)
    try:
        for i, ev in interleave([h.iter_events(15.0) for h in handles], _error_event):
            if ev is None:
                yield b":\n\n"
                continue
            if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
                yield sse({"error": {"message": f"Request failed during generation: {ev.error or 'aborted'}",
                                     "type": "server_error", "code": 424, "http_status_code": 424}})
                break
            n_out += 1
            finish = finish_reason(ev.finish_reason) if ev.finish_reason is not None else None
            lp = None
            if req.logprobs is not None and not (ev.special and ev.finish_reason == FinishReason.EOS_TOKEN):
                lp = _legacy_logprobs([ev], offsets[i])
                offsets[i] += len(ev.delta)
            if ev.delta or finish or lp:
                ch = {"index": i, "text": ev.delta, "logprobs": lp, "finish_reason": finish}
                if finish:
                    ch["stop_reason"] = ev.stop_reason
                yield sse({**base, "choices": [ch]})
        else:
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(n_prompt, n_out)})
        yield SSE_DONE
        done = True
    finally:
        if not done:
            for h in handles:
                h.abort()


def models(ctx: ServingContext) -> JsonResponse:
    return JsonResponse({"object": "list", "data": [
        {"id": ctx.served_name, "object": "model", "created": 0, "owned_by": "sagellm",
         "max_model_len": ctx.max_total_tokens}]})
