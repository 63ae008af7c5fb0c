"""A Responses API request as the chat path reads it: `input` items (messages, function_call,
function_call_output) and a previous response's turns become chat messages; function tools,
tool_choice and text.format become chat's tools, tool_choice and response_format. Fields this
server does not implement are refused here (400 naming the field), before anything runs."""

from __future__ import annotations

from typing import Any

from sagellm.api.error_shapes import invalid
from sagellm.api.protocol_responses import FunctionCallItem, OutputMessage, ResponseObject, ResponsesRequest
from sagellm.errors import BadRequest, NotFound, SagellmError

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# Fields refused when set (to anything but null/false/empty): what each would need.
REFUSED = {
    "reasoning": "this model does not reason (no reasoning tokens or summaries)",
    "background": "background mode is not supported; send the request and wait, or stream it",
    "conversation": "conversations are not stored; use previous_response_id",
    "prompt": "stored prompt templates are not supported; send `input` and `instructions`",
    "max_tool_calls": "built-in tools are not supported, so there is nothing to limit",
}
# Chat's names in messages from the shared chat path, as a Responses client knows them.
RENAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}


def refuse_unsupported(body: dict) -> None:
    for name, why in REFUSED.items():
        value = body.get(name)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        if value not in (None, False, {}, []):
            raise BadRequest(f"`{name}` is not supported: {why}", param=name)
    if body.get("truncation") not in (None, "disabled"):
        raise BadRequest("`truncation` must be \"disabled\": this server never drops turns from the input; "
                         "a too-long input is a 422", param="truncation")
    text = body.get("text")
    if isinstance(text, dict) and text.get("verbosity") not in (None, "medium"):
        raise BadRequest("`text.verbosity` is not supported", param="text.verbosity")


def renamed(exc: SagellmError) -> SagellmError:
    """An error from the chat path, in the Responses API's field names."""
    for chat_name, ours in RENAMES.items():
        exc.message = exc.message.replace(f"`{chat_name}", f"`{ours}")
    if exc.param is not None:
        head, _, rest = exc.param.partition(".")
        exc.param = RENAMES.get(head, head) + (f".{rest}" if rest else "")
    return exc


def _text_of(content: Any, where: str, allowed: tuple[str, ...]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"`{where}` must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed or not isinstance(part.get("text"), str):
            raise invalid(f"`{where}.{j}` of type {kind!r} is not supported by this text-only model; "
                          f"send parts of type {' or '.join(allowed)}", f"{where}.{j}.type")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(items: str | list[dict]) -> list[dict]:
    """`input` as chat messages; consecutive function calls become one assistant message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise invalid(f"`{where}` must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"`{where}.role` must be user, assistant, system or developer. Given: {role!r}",
                              f"{where}.role")
            text = _text_of(item.get("content"), f"{where}.content", ("input_text", "output_text", "text"))
            out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if not isinstance(call["id"], str) or not isinstance(call["function"]["name"], str):
                raise invalid(f"`{where}` needs `call_id` and `name`", where)
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not out[-1]["content"]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise invalid(f"`{where}.call_id` is required", f"{where}.call_id")
            text = _text_of(item.get("output", ""), f"{where}.output", ("input_text", "output_text", "text"))
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        else:
            raise BadRequest(f"`{where}.type` {kind!r} is not supported; items may be message, function_call "
                             "or function_call_output", param=f"{where}.type")
    return out


def output_messages(resp: ResponseObject) -> list[dict]:
    """A response's output items as the assistant's turns of the conversation."""
    out: list[dict] = []
    for item in resp.output:
        if isinstance(item, OutputMessage):
            out.append({"role": "assistant", "content": "".join(c.text for c in item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1].get("tool_calls") and not out[-1]["content"]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
    return out


def conversation(ctx, req: ResponsesRequest) -> list[dict]:
    """The whole conversation (without instructions): the previous response's, then `input`."""
    before: list[dict] = []
    if req.previous_response_id is not None:
        stored = ctx.store.get(req.previous_response_id)
        if stored is None:
            raise NotFound(f"previous response {req.previous_response_id!r} not found (unknown, deleted, older "
                           f"than RESPONSES_STORE_TTL_S or dropped by RESPONSES_STORE_SIZE)",
                           param="previous_response_id")
        before = stored.messages + output_messages(stored.response)
    messages = before + input_messages(req.input)
    if not messages:
        raise invalid("`input` must not be empty", "input")
    return messages


def _tools(req: ResponsesRequest) -> list[dict] | None:
    if req.tools is None:
        return None
    out = []
    for i, tool in enumerate(req.tools):
        if tool.get("type") != "function":
            raise BadRequest(f"`tools.{i}.type` {tool.get('type')!r} is not supported: built-in tools are not "
                             "served; only function tools", param=f"tools.{i}.type")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                     if k in tool}})
    return out


def _tool_choice(choice):
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest(f"`tool_choice` of type {choice.get('type')!r} is not supported; use \"auto\", \"none\", "
                     "\"required\" or {\"type\": \"function\", \"name\": ...}", param="tool_choice")


def _response_format(req: ResponsesRequest) -> dict | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.get("type") != "json_schema":
        return fmt
    # Responses puts name/schema/strict beside the type; strict or not, the schema is enforced.
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}


def chat_body(req: ResponsesRequest, messages: list[dict]) -> dict:
    """The chat completions body the shared chat path prepares."""
    include = req.include or []
    for name in include:
        if name != LOGPROBS_INCLUDE:
            raise BadRequest(f"`include` value {name!r} is not supported (only {LOGPROBS_INCLUDE!r})",
                             param="include")
    logprobs = LOGPROBS_INCLUDE in include or req.top_logprobs is not None
    system = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    body = {"messages": system + messages, "max_completion_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "tools": _tools(req),
            "tool_choice": _tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
            "response_format": _response_format(req), "logprobs": logprobs, "top_logprobs": req.top_logprobs}
    return {k: v for k, v in body.items() if v is not None}
