"""/v1/chat/completions (and Messages bodies on /invocations): the conversation through the chat
template, tools (sagellm/api/tools.py), response_format (structured.py), logprobs and n choices,
whole or streamed."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sagellm.api.context import ServingContext
from sagellm.api.openai import (FINGERPRINT, check_n, choice_params, finish_reason, interleave, openai_params,
                                usage)
from sagellm.api.parse import parse
from sagellm.api.protocol import ChatCompletionRequest
from sagellm.api.responses import SSE_DONE, SSE_HEADERS, SSE_KEEPALIVE, JsonResponse, StreamResponse, sse
from sagellm.api.sampling import invalid
from sagellm.api.structured import grammar_for
from sagellm.api.tools import CallStreamer, ToolPlan, parse_calls, plan_tools
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import GenerationError, ToolError

def _flatten(msg, ctx: ServingContext) -> dict:
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
        if ctx.engine.template_shows_tools:
            out["tool_calls"] = msg.tool_calls
        elif not out["content"]:  # the template cannot show them: write them as this server asks for calls
            out["content"] = json.dumps([_call_as_written(c) for c in msg.tool_calls], ensure_ascii=False)
    if msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    if msg.name:
        out["name"] = msg.name
    return out


def _call_as_written(call: dict) -> dict:
    fn = call.get("function") or {}
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass
    return {"name": fn.get("name"), "arguments": args}


@dataclass
class ChatJob:
    """A validated chat request: what to submit per choice, and how to answer in text instead
    when tool_choice "auto" lets the model decline every tool."""

    req: ChatCompletionRequest
    ids: list[int]
    params: SamplingParams
    tools: ToolPlan | None
    # Renders the tool-free prompt for a declined call, only when the model declines: it is no
    # longer than the tool prompt, which passed the same length checks.
    plain: Callable[[], tuple[list[int], SamplingParams]] | None
    prompt: str  # the rendered conversation, as the model sees it


def prepare_chat(ctx: ServingContext, body) -> ChatJob:
    req = parse(ChatCompletionRequest, body)
    top_n = 0
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise invalid("`top_logprobs` needs `logprobs: true`", "top_logprobs")
        if not 0 <= req.top_logprobs <= ctx.settings.max_top_n_tokens:
            raise invalid(f"`top_logprobs` must be >= 0 and <= {ctx.settings.max_top_n_tokens}. "
                          f"Given: {req.top_logprobs}", "top_logprobs")
        top_n = req.top_logprobs
    check_n(ctx, req)
    tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    if tools is not None and req.response_format is not None and req.response_format.get("type") != "text":
        raise ToolError("Tool error: `tools` and `response_format` cannot be combined in one request; "
                        "describe the answer's shape in a tool's parameters instead", param="response_format")
    grammar = grammar_for(ctx, req.response_format, "response_format")
    messages = [_flatten(m, ctx) for m in req.messages]
    cont = req.continue_final_message if req.continue_final_message is not None else messages[-1]["role"] == "assistant"

    def render(msgs, with_tools: bool) -> tuple[str, list[int]]:
        prompt = ctx.engine.render_chat(msgs, tools=tools.template_tools() if with_tools and ctx.engine.template_shows_tools
                                 else None, add_generation_prompt=not cont, continue_final_message=cont,
                                 kwargs=req.chat_template_kwargs)
        return prompt, ctx.engine.encode_chat(prompt)

    plain = None
    if tools is not None:
        if cont:
            raise ToolError("Tool error: tools cannot continue a final assistant message", param="messages")
        if not ctx.engine.supports_grammar:
            raise ToolError("Tool error: tools need constrained decoding (DISABLE_GRAMMAR_SUPPORT is set)",
                            param="tools")
        grammar = ctx.engine.compile_grammar("json_schema", tools.schema(), "tools")
        instruction = req.tool_prompt or tools.prompt(with_list=not ctx.engine.template_shows_tools)
        last = dict(messages[-1])
        last["content"] = f"{last['content']}\n---\n{instruction}"
        prompt, ids = render(messages[:-1] + [last], True)
        if tools.allow_text:
            def plain():
                _, plain_ids = render(messages, False)
                return plain_ids, openai_params(ctx, req, len(plain_ids), "messages", top_n, bool(req.logprobs))
    else:
        prompt, ids = render(messages, False)
    params = openai_params(ctx, req, len(ids), "messages", top_n, logprobs=bool(req.logprobs))
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    if tools is not None:  # a stop string inside the arguments would break the call's JSON
        params = dataclasses.replace(params, stop=())
    return ChatJob(req, ids, params, tools, plain, prompt)


def _logprob_entry(ev: TokenEvent) -> dict:
    def one(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    entry = one(ev.text, ev.logprob)
    entry["top_logprobs"] = [one(t.text, t.logprob) for t in ev.top_tokens]
    return entry


def _choice_events(ctx: ServingContext, job: ChatJob, index: int, handle):
    """One choice as a sequence of parts: ("text", delta, logprobs entries or None),
    ("calls", tool_call deltas), ("end", finish_reason, stop_reason, completion tokens),
    ("error", message); None while idle. A declined tool call (`no_tool`) is replaced by a
    plain answer to the tool-free prompt. Closing it aborts the request."""
    streamer = CallStreamer() if job.tools is not None else None
    n_out = 0
    done = False
    try:
        for ev in handle.iter_events(15.0):
            if ev is None:
                yield None
                continue
            if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
                done = True
                yield ("error", ev.error or "aborted")
                return
            n_out += 1
            if streamer is None:
                lp = None
                if job.req.logprobs and not (ev.special and ev.finish_reason == FinishReason.EOS_TOKEN):
                    lp = [_logprob_entry(ev)]
                if ev.delta or lp:
                    yield ("text", ev.delta, lp)
            else:
                deltas, first = streamer.feed(ev.delta)
                if first == job.tools.no_tool and job.plain is not None:
                    handle.abort()
                    done = True
                    plain_ids, plain_params = job.plain()
                    plain_job = dataclasses.replace(job, ids=plain_ids, params=plain_params, tools=None, plain=None)
                    yield from _choice_events(ctx, plain_job, index,
                                              ctx.submit(plain_ids, choice_params(plain_params, index)))
                    return
                if deltas:
                    yield ("calls", deltas)
            if ev.finish_reason is not None:
                done = True
                reason = finish_reason(ev.finish_reason)
                if streamer is not None:
                    calls = parse_calls(streamer.text)
                    if calls is not None:
                        reason = "tool_calls"
                    elif ev.finish_reason != FinishReason.LENGTH:
                        yield ("error", "the model's tool call did not complete")
                        return
                    else:
                        yield ("text", streamer.text, None)  # cut by the token limit: shown as text
                yield ("end", reason, ev.stop_reason, n_out)
                return
    finally:
        if not done:
            handle.abort()


def _submit_choices(ctx: ServingContext, job: ChatJob) -> list:
    n = job.req.n or 1
    handles = []
    try:
        for i in range(n):
            handles.append(ctx.submit(job.ids, choice_params(job.params, i)))
    except BaseException:
        for h in handles:
            h.abort()
        raise
    return handles


def chat(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    job = prepare_chat(ctx, body)
    handles = _submit_choices(ctx, job)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": cid, "created": created, "model": ctx.engine.model.served_name, "system_fingerprint": FINGERPRINT}
    choices = [_choice_events(ctx, job, i, h) for i, h in enumerate(handles)]
    if job.req.stream:
        return StreamResponse(_chat_stream(job.req, choices, handles, base, len(job.ids)), dict(SSE_HEADERS))
    out, n_out = [], 0
    try:
        for index, parts in enumerate(choices):
            text, logprobs, calls = [], [], {}
            for part in parts:
                if part is None:
                    continue
                if part[0] == "error":
                    raise GenerationError(f"Request failed during generation: {part[1]}")
                if part[0] == "text":
                    text.append(part[1])
                    logprobs.extend(part[2] or [])
                elif part[0] == "calls":
                    for d in part[1]:
                        call = calls.setdefault(d["index"], {"id": d.get("id"), "type": "function",
                                                             "function": {"name": None, "arguments": ""}})
                        call["function"]["name"] = d["function"].get("name") or call["function"]["name"]
                        call["function"]["arguments"] += d["function"]["arguments"]
                else:
                    _, reason, stop_reason, count = part
            n_out += count
            message = {"role": "assistant", "content": "".join(text)}
            if reason == "tool_calls":
                message = {"role": "assistant", "content": None, "tool_calls": [calls[k] for k in sorted(calls)]}
            out.append({"index": index, "message": message,
                        "logprobs": {"content": logprobs} if job.req.logprobs else None,
                        "finish_reason": reason, "stop_reason": stop_reason})
    finally:
        for parts in choices:
            parts.close()
        for h in handles:  # choices never started (an earlier one failed) hold requests too
            h.abort()
    return JsonResponse({**base, "object": "chat.completion", "choices": out,
                         "usage": usage(len(job.ids), n_out)})


def _chat_stream(req, choices, handles, base, n_prompt):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish=None, logprobs=None, stop_reason=None) -> bytes:
        ch = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            ch["stop_reason"] = stop_reason
        return sse({**base, "object": "chat.completion.chunk", "choices": [ch], **extra})

    # The per-token chunk is the same JSON around a new string: build its two halves once per
    # choice (the streaming threads' serialisation work competes with the engine for the CPU).
    marker = "\u0000sagellm\u0000"
    halves = [chunk(i, {"content": marker}).split(json.dumps(marker, ensure_ascii=False).encode())
              for i in range(len(choices))]
    n_out, open_ = 0, len(choices)
    for i in range(len(choices)):
        yield chunk(i, {"role": "assistant", "content": ""})
    merged = interleave(choices, lambda exc: ("error", str(exc)))
    try:
        for i, part in merged:
            if part is None:
                yield SSE_KEEPALIVE
            elif part[0] == "text":
                if part[2]:
                    yield chunk(i, {"content": part[1]}, logprobs={"content": part[2]})
                elif part[1]:
                    head, tail = halves[i]
                    yield head + json.dumps(part[1], ensure_ascii=False).encode() + tail
            elif part[0] == "calls":
                yield chunk(i, {"tool_calls": part[1]})
            elif part[0] == "end":
                n_out += part[3]
                yield chunk(i, {}, part[1], stop_reason=part[2])
                open_ -= 1
            else:
                yield sse({"error": {"message": f"Request failed during generation: {part[1]}",
                                     "type": "server_error", "code": 424, "http_status_code": 424}})
                yield SSE_DONE
                return
        if include_usage:
            yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(n_prompt, n_out)})
        yield SSE_DONE
    finally:
        merged.close()
        for h in handles:  # a client gone mid-stream: stop every choice now
            h.abort()
