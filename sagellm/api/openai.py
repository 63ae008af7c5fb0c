"""The OpenAI API: /v1/chat/completions, /v1/completions, /v1/models (and /invocations bodies of
those shapes). finish_reason is only ever "stop" or "length"; stop strings are cut from the text."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid

from sagellm import __version__
from sagellm.api.context import ServingContext
from sagellm.api.parse import parse
from sagellm.api.protocol import ChatCompletionRequest, CompletionRequest, _OpenAISampling
from sagellm.api.responses import SSE_DONE, SSE_HEADERS, JsonResponse, StreamResponse, event_stream, sse
from sagellm.api.sampling import build_params, check_common, invalid, resolve_max_new
from sagellm.api.tgi import collect
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.errors import ValidationError

FINGERPRINT = f"sagellm-{__version__}"


def finish_reason(reason: FinishReason) -> str:
    return "length" if reason == FinishReason.LENGTH else "stop"


def _stops(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _sampling(ctx: ServingContext, req: _OpenAISampling, prompt_len: int, inputs_name: str,
              top_n: int = 0, logprobs: bool = False):
    stop = _stops(req.stop)
    requested = next((v for v in (req.max_completion_tokens, req.max_tokens, req.max_new_tokens)
                      if v is not None), None)
    name = ("max_completion_tokens" if req.max_completion_tokens is not None else
            "max_tokens" if req.max_tokens is not None else "max_new_tokens")
    check_common(ctx, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, typical_p=None,
                 repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                 presence_penalty=req.presence_penalty, stop=stop, seed=req.seed, max_new_name=name,
                 max_new_tokens=requested)
    if req.n is not None and req.n != 1:
        raise invalid(f"`n` must be 1 on this server for now. Given: {req.n}", "n")
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
                        temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                        repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                        presence_penalty=req.presence_penalty, stop=stop, seed=req.seed, logit_bias=bias,
                        min_new_tokens=req.min_tokens, ignore_eos=req.ignore_eos, top_n_tokens=top_n,
                        logprobs=logprobs)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- chat ----

def _flatten(msg) -> dict:
    content = msg.content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if part.type != "text":
                raise invalid(f"`content` part of type {part.type!r} is not supported by this "
                              "text-only model; send text parts", "messages")
            texts.append(part.text)
        content = "".join(texts)
    out = {"role": msg.role, "content": content if content is not None else ""}
    if msg.tool_calls:
        out["tool_calls"] = msg.tool_calls
    if msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    if msg.name:
        out["name"] = msg.name
    return out


def prepare_chat(ctx: ServingContext, body):
    req = parse(ChatCompletionRequest, body)
    if req.tools:
        raise invalid("`tools` are not supported by this server yet", "tools")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise invalid(f"`response_format` of type {fmt!r} is not supported by this server yet", "response_format")
    top_n = 0
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise invalid("`top_logprobs` needs `logprobs: true`", "top_logprobs")
        if not 0 <= req.top_logprobs <= ctx.settings.max_top_n_tokens:
            raise invalid(f"`top_logprobs` must be >= 0 and <= {ctx.settings.max_top_n_tokens}. "
                          f"Given: {req.top_logprobs}", "top_logprobs")
        top_n = req.top_logprobs
    messages = [_flatten(m) for m in req.messages]
    cont = req.continue_final_message if req.continue_final_message is not None else messages[-1]["role"] == "assistant"
    prompt = ctx.render_chat(messages, add_generation_prompt=not cont, continue_final_message=cont,
                             kwargs=req.chat_template_kwargs)
    ids = ctx.encode_chat(prompt)
    params = _sampling(ctx, req, len(ids), "messages", top_n, logprobs=bool(req.logprobs))
    return req, ids, params


def _logprob_entry(ctx, ev: TokenEvent) -> dict:
    def one(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    entry = one(ev.text, ev.logprob)
    entry["top_logprobs"] = [one(t.text, t.logprob) for t in ev.top_tokens]
    return entry


def chat(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    req, ids, params = prepare_chat(ctx, body)
    handle = ctx.submit(ids, params)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": cid, "created": created, "model": ctx.served_name, "system_fingerprint": FINGERPRINT}
    if req.stream:
        return StreamResponse(_chat_stream(ctx, req, handle, base, len(ids)), dict(SSE_HEADERS))
    try:
        events, finish = collect(handle)
    finally:
        handle.abort()
    visible = [e for e in events if not (e.special and e.finish_reason == FinishReason.EOS_TOKEN)]
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(e.delta for e in events)},
              "logprobs": {"content": [_logprob_entry(ctx, e) for e in visible]} if req.logprobs else None,
              "finish_reason": finish_reason(finish), "stop_reason": events[-1].stop_reason}
    return JsonResponse({**base, "object": "chat.completion", "choices": [choice],
                         "usage": _usage(len(ids), len(events))})


def _chat_stream(ctx, req, handle, base, n_prompt):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n_out = 0

    def chunk(delta: dict, finish=None, logprobs=None, stop_reason=None) -> bytes:
        ch = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            ch["stop_reason"] = stop_reason
        out = {**base, "object": "chat.completion.chunk", "choices": [ch]}
        if include_usage:
            out["usage"] = None
        return sse(out)

    def render(ev: TokenEvent) -> list[bytes]:
        nonlocal n_out
        if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
            return [sse({"error": {"message": f"Request failed during generation: {ev.error or 'aborted'}",
                                   "type": "server_error", "code": 424, "http_status_code": 424}}), SSE_DONE]
        n_out += 1
        out = []
        lp = None
        if req.logprobs and not (ev.special and ev.finish_reason == FinishReason.EOS_TOKEN):
            lp = {"content": [_logprob_entry(ctx, ev)]}
        if lp:
            out.append(chunk({"content": ev.delta}, logprobs=lp))
        elif ev.delta:
            out.append(content_head + json.dumps(ev.delta, ensure_ascii=False).encode() + content_tail)
        if ev.finish_reason is not None:
            out.append(chunk({}, finish_reason(ev.finish_reason), stop_reason=ev.stop_reason))
            if include_usage:
                out.append(sse({**base, "object": "chat.completion.chunk", "choices": [],
                                "usage": _usage(n_prompt, n_out)}))
            out.append(SSE_DONE)
        return out

    # The per-token chunk is the same JSON around a new string: build its two halves once (the
    # streaming threads' serialisation work competes with the engine for the CPU).
    marker = "\u0000sagellm\u0000"
    head, tail = chunk({"content": marker}).split(json.dumps(marker, ensure_ascii=False).encode())
    content_head, content_tail = head, tail
    yield chunk({"role": "assistant", "content": ""})
    yield from event_stream(handle, render)


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
    jobs = []
    for i, text in enumerate(prompts):
        if not text:
            raise invalid(f"`prompt` {i} cannot be empty", "prompt")
        ids = ctx.tokenize(text, True)
        jobs.append((text, ids, _sampling(ctx, req, len(ids), "prompt")))
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
    n_prompt = sum(len(ids) for _, ids, _ in jobs)
    if req.stream:
        return StreamResponse(_completion_stream(req, handles, base, n_prompt), dict(SSE_HEADERS))
    choices, n_out = [], 0
    try:
        for i, (handle, (text, _, _)) in enumerate(zip(handles, jobs)):
            events, finish = collect(handle)
            n_out += len(events)
            out_text = "".join(e.delta for e in events)
            choices.append({"index": i, "text": (text + out_text) if req.echo else out_text, "logprobs": None,
                            "finish_reason": finish_reason(finish), "stop_reason": events[-1].stop_reason})
    finally:
        for h in handles:
            h.abort()
    return JsonResponse({**base, "choices": choices, "usage": _usage(n_prompt, n_out)})


def _merged(handles):
    """Events of several requests as (index, event), in the order they are produced."""
    if len(handles) == 1:
        for ev in handles[0].iter_events(15.0):
            yield 0, ev
        return
    q: queue.SimpleQueue = queue.SimpleQueue()

    def pump(i, h):
        try:
            for ev in h.iter_events():
                q.put((i, ev))
        except Exception as exc:  # engine died: surface as an error event
            q.put((i, TokenEvent(0, -1, "", 0.0, True, "", [], FinishReason.ERROR, None, str(exc))))
        q.put((i, None))

    for i, h in enumerate(handles):
        threading.Thread(target=pump, args=(i, h), daemon=True).start()
    open_ = len(handles)
    while open_:
        i, ev = q.get()
        if ev is None:
            open_ -= 1
            continue
        yield i, ev


def _completion_stream(req, handles, base, n_prompt):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n_out = 0
    done = False
    try:
        for i, ev in _merged(handles):
            if ev is None:
                yield b":\n\n"
                continue
            if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
                yield sse({"error": {"message": f"Request failed during generation: {ev.error or 'aborted'}",
                                     "type": "server_error", "code": 424, "http_status_code": 424}})
                break
            n_out += 1
            finish = finish_reason(ev.finish_reason) if ev.finish_reason is not None else None
            if ev.delta or finish:
                ch = {"index": i, "text": ev.delta, "logprobs": None, "finish_reason": finish}
                if finish:
                    ch["stop_reason"] = ev.stop_reason
                yield sse({**base, "choices": [ch]})
        else:
            if include_usage:
                yield sse({**base, "choices": [], "usage": _usage(n_prompt, n_out)})
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
