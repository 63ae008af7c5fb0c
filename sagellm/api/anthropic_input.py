"""An Anthropic Messages request as the chat path reads it: system, text / tool_use / tool_result
blocks, tools with input_schema and tool_choice become chat messages, tools and tool_choice;
stop_sequences, top_k and the rest become chat's sampling fields. Fields and blocks this server
does not implement are refused here, naming them."""

from __future__ import annotations

import json
from typing import Any

from sagellm.api.error_shapes import invalid
from sagellm.errors import BadRequest, SagellmError

# Chat's names in messages from the shared chat path, as an Anthropic client knows them.
RENAMES = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences", "response_format": "output_config.format"}


def refuse_unsupported(body: dict) -> None:
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled"):
        raise BadRequest("`thinking` is not supported: this model does not reason", param="thinking")
    config = body.get("output_config")
    if isinstance(config, dict) and config.get("effort") is not None:
        raise BadRequest("`output_config.effort` is not supported: this model does not reason",
                         param="output_config.effort")
    for name in ("container", "mcp_servers"):
        if body.get(name):
            raise BadRequest(f"`{name}` is not supported", param=name)


def renamed(exc: SagellmError) -> SagellmError:
    for chat_name, ours in RENAMES.items():
        exc.message = exc.message.replace(f"`{chat_name}`", f"`{ours}`")
    if exc.param is not None:
        exc.param = RENAMES.get(exc.param, exc.param)
    return exc


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"`{where}` must be a string or a list of text blocks", where)
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else None
            raise invalid(f"`{where}.{j}` of type {kind!r} is not supported by this text-only model; "
                          "send text blocks", f"{where}.{j}.type")
        texts.append(block["text"])
    return "".join(texts)


def system_text(system) -> str | None:
    return None if system is None else _text_of(system, "system")


def chat_messages(messages) -> list[dict]:
    """Anthropic's turns as chat messages: a user turn's tool_result blocks become tool messages
    (before its text), an assistant turn's tool_use blocks its tool_calls."""
    out: list[dict] = []
    for i, msg in enumerate(messages):
        where = f"messages.{i}.content"
        if isinstance(msg.content, str):
            out.append({"role": msg.role, "content": msg.content})
            continue
        texts, calls, results = [], [], []
        for j, block in enumerate(msg.content):
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and msg.role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise invalid(f"`{where}.{j}` needs `id` and `name`", f"{where}.{j}")
                calls.append({"id": block["id"], "type": "function",
                              "function": {"name": block["name"],
                                           "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
            elif kind == "tool_result" and msg.role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise invalid(f"`{where}.{j}.tool_use_id` is required", f"{where}.{j}.tool_use_id")
                text = _text_of(block.get("content", ""), f"{where}.{j}.content")
                if block.get("is_error"):  # chat templates have no word for it: say it in the text
                    text = f"Error: {text}"
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            else:
                raise invalid(f"`{where}.{j}` of type {kind!r} is not supported in a {msg.role} turn by this "
                              "text-only model (text, tool_use in assistant turns, tool_result in user turns)",
                              f"{where}.{j}.type")
        out.extend(results)
        if msg.role == "assistant":
            out.append({"role": "assistant", "content": "".join(texts), **({"tool_calls": calls} if calls else {})})
        elif texts or not results:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def _tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") not in (None, "custom") or not isinstance(tool.get("name"), str):
            raise BadRequest(f"`tools.{i}.type` {tool.get('type')!r} is not supported: server tools are not "
                             "served; declare client tools with name, description and input_schema",
                             param=f"tools.{i}.type")
        fn = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice) -> tuple[Any, bool | None]:
    """Chat's tool_choice and parallel_tool_calls."""
    if choice is None:
        return None, None
    parallel = False if choice.get("disable_parallel_tool_use") else None
    kind = choice.get("type")
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    words = {"auto": "auto", "any": "required", "none": "none"}
    if kind not in words:
        raise invalid('`tool_choice.type` must be "auto", "any", "tool" (with "name") or "none". '
                      f"Given: {kind!r}", "tool_choice.type")
    return words[kind], parallel


def _response_format(config: dict | None) -> dict | None:
    """output_config.format ({"type": "json_schema", "schema": ...}) as chat's response_format."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise invalid('`output_config.format` must be {"type": "json_schema", "schema": {...}}',
                      "output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def chat_body(req, max_tokens: int | None) -> dict:
    """The chat completions body the shared chat path prepares."""
    system = system_text(req.system)
    tool_choice, parallel = _tool_choice(req.tool_choice)
    body = {"messages": ([{"role": "system", "content": system}] if system is not None else [])
            + chat_messages(req.messages),
            "max_completion_tokens": max_tokens, "temperature": getattr(req, "temperature", None),
            "top_p": getattr(req, "top_p", None), "top_k": getattr(req, "top_k", None),
            "stop": getattr(req, "stop_sequences", None), "tools": _tools(req.tools), "tool_choice": tool_choice,
            "parallel_tool_calls": parallel, "response_format": _response_format(getattr(req, "output_config", None))}
    return {k: v for k, v in body.items() if v is not None}
