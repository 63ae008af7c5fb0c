"""/v1/chat/completions (and Messages bodies on /invocations): the conversation through the chat
template, tools (sagellm/api/tools.py), response_format (structured.py), logprobs and n choices,
whole or streamed; each choice's parts come from chat_parts.py."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

from pydantic import MISSING

from sagellm.api.chat_parts import CallsPart, ChatJob, EndPart, ErrorPart, TextPart, choice_parts
from sagellm.api.choices import FINGERPRINT, interleave
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import error_event, invalid, stream_failure
from sagellm.api.parse import parse
from sagellm.api.protocol import ChatCompletionRequest
from sagellm.api.protocol_openai import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk,
                                         ChoiceLogprobs, ChunkChoice, Delta, FunctionCall, ToolCall, Usage)
from sagellm.api.responses import SSE_DONE, SSE_HEADERS, SSE_KEEPALIVE, JsonResponse, StreamResponse, sse
from sagellm.api.prompt_tokens import tokenize_bounded
from sagellm.api.sampling import check_n, openai_params
from sagellm.api.structured import grammar_for
from sagellm.api.submit import submit_n
from sagellm.api.tools import plan_tools, tool_error


ROLES = ("system", "developer", "user", "assistant", "tool")


def _flatten(i: int, msg, ctx: ServingContext) -> dict:
    if msg.role not in ROLES:  # a template would render it, or drop it, silently
        raise invalid(f"`messages[{i}].role` must be one of {list(ROLES)}. Given: {msg.role!r}",
                      f"messages[{i}].role")
    content = msg.content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if part.type != "text":
                raise invalid(f"`content` part of type {part.type!r} is not supported by this "
                              "text-only model; send text parts", "messages")
            texts.append(part.text)
        content = "".join(texts)
    # OpenAI's newer name for the system message; chat templates know only "system".
    role = "system" if msg.role == "developer" else msg.role
    out = {"role": role, "content": content if content is not None else ""}
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
    check_n(ctx, req.n)
    tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    if tools is not None and req.response_format is not None and req.response_format.get("type") != "text":
        raise tool_error("`tools` and `response_format` cannot be combined in one request; "
                         "describe the answer's shape in a tool's parameters instead", "response_format")
    grammar = grammar_for(ctx, req.response_format, "response_format")
    messages = [_flatten(i, m, ctx) for i, m in enumerate(req.messages)]
    cont = req.continue_final_message if req.continue_final_message is not None else messages[-1]["role"] == "assistant"

    def render(msgs, with_tools: bool) -> tuple[str, list[int]]:
        shown = tools.template_tools() if with_tools and ctx.engine.template_shows_tools else None
        prompt = ctx.engine.render_chat(msgs, tools=shown, add_generation_prompt=not cont,
                                        continue_final_message=cont, kwargs=req.chat_template_kwargs)
        return prompt, tokenize_bounded(ctx, prompt, "messages", ctx.engine.limits.max_input_tokens,
                                        ctx.engine.encode_chat)

    plain = None
    if tools is not None:
        if cont:
            raise tool_error("tools cannot continue a final assistant message", "messages")
        if not ctx.engine.supports_grammar:
            raise tool_error("tools need constrained decoding (DISABLE_GRAMMAR_SUPPORT is set)")
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


def chat(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    job = prepare_chat(ctx, body)
    streams = submit_n(ctx, job.ids, job.params, job.req.n or 1)
    head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                model=job.params.adapter or ctx.engine.model.served_name,
                system_fingerprint=FINGERPRINT)
    choices = [choice_parts(job, i, s, ctx.submit) for i, s in enumerate(streams)]
    if job.req.stream:
        return StreamResponse(_stream(job.req, choices, streams, head, len(job.ids)), dict(SSE_HEADERS))
    try:
        out = [_whole_choice(job, index, parts) for index, parts in enumerate(choices)]
    finally:
        for parts in choices:
            parts.close()
        for s in streams:  # choices never started (an earlier one failed) hold requests too
            s.abort()
    usage = Usage.of(len(job.ids), sum(n for _, n in out))
    return JsonResponse(ChatCompletion(**head, choices=[c for c, _ in out], usage=usage))


def _whole_choice(job: ChatJob, index: int, parts) -> tuple[ChatChoice, int]:
    """The choice, and how many tokens it generated."""
    text, logprobs, calls = [], [], {}
    for part in parts:
        if isinstance(part, ErrorPart):
            raise part.error
        if isinstance(part, TextPart):
            text.append(part.text)
            logprobs.extend(part.logprobs or [])
        elif isinstance(part, CallsPart):
            for d in part.deltas:
                call = calls.setdefault(d.index, ToolCall(id=None if d.id is MISSING else d.id,
                                                          function=FunctionCall(name=None, arguments="")))
                if d.function.name is not MISSING and d.function.name:
                    call.function.name = d.function.name
                call.function.arguments += d.function.arguments
        elif isinstance(part, EndPart):
            end = part
    message = AssistantMessage(content="".join(text))
    if end.finish_reason == "tool_calls":
        message = AssistantMessage(content=None, tool_calls=[calls[k] for k in sorted(calls)])
    choice = ChatChoice(index=index, message=message,
                        logprobs=ChoiceLogprobs(content=logprobs) if job.req.logprobs else None,
                        finish_reason=end.finish_reason, stop_reason=end.stop_reason)
    return choice, end.completion_tokens


def _stream(req: ChatCompletionRequest, choices, streams, head: dict, n_prompt: int):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    usage = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: Delta, finish=None, logprobs=None, stop_reason=MISSING) -> bytes:
        choice = ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)
        return sse(ChatCompletionChunk(**head, choices=[choice], **usage))

    # The per-token chunk is the same JSON around a new string: build its two halves once per
    # choice (the streaming threads' serialisation work competes with the engine for the CPU).
    marker = "\u0000sagellm\u0000"
    halves = [chunk(i, Delta(content=marker)).split(json.dumps(marker, ensure_ascii=False).encode())
              for i in range(len(choices))]
    n_out = 0
    for i in range(len(choices)):
        yield chunk(i, Delta(role="assistant", content=""))
    merged = interleave(choices, lambda exc: ErrorPart(stream_failure(exc)))
    try:
        for i, part in merged:
            if part is None:
                yield SSE_KEEPALIVE
            elif isinstance(part, TextPart):
                if part.logprobs:
                    yield chunk(i, Delta(content=part.text), logprobs=ChoiceLogprobs(content=part.logprobs))
                elif part.text:
                    head_bytes, tail = halves[i]
                    yield head_bytes + json.dumps(part.text, ensure_ascii=False).encode() + tail
            elif isinstance(part, CallsPart):
                yield chunk(i, Delta(tool_calls=part.deltas))
            elif isinstance(part, EndPart):
                n_out += part.completion_tokens
                yield chunk(i, Delta(), part.finish_reason, stop_reason=part.stop_reason)
            else:
                yield error_event(part.error, "openai")
                yield SSE_DONE
                return
        if include_usage:
            yield sse(ChatCompletionChunk(**head, choices=[], usage=Usage.of(n_prompt, n_out)))
        yield SSE_DONE
    finally:
        merged.close()
        for s in streams:  # a client gone mid-stream: stop every choice now
            s.abort()
