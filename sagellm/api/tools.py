"""Tool calling on the chat API: the candidate functions, the JSON schema that constrains a reply
to calls of them, the prompt that shows them to the model, and parsing of the reply (whole or
streamed) back into OpenAI `tool_calls`.

The model answers with a JSON array of calls, `[{"name": "f", "arguments": {...}}, ...]`,
enforced by constrained decoding so the arguments always match the function's parameters. With
`tool_choice: "auto"` one more candidate, `no_tool`, lets the model decline; the server then
answers in plain text with a second, unconstrained generation (as TGI does).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from sagellm.errors import ToolError

NO_TOOL = "no_tool"
MAX_PARALLEL_CALLS = 8
_PROMPT = ("You can call these functions. To call one or more, answer only with a JSON array "
           'of calls: [{"name": <function name>, "arguments": <an object matching its parameters>}]. '
           'If none of them is needed, call "%s" with no arguments.')


def tool_error(message: str, param: str = "tools") -> ToolError:
    return ToolError(f"Tool error: {message}", param=param)


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict


@dataclass
class ToolPlan:
    """What a request's `tools`/`tool_choice`/`parallel_tool_calls` ask for."""

    functions: list[Function]  # all declared tools (shown to the model)
    candidates: list[Function]  # those the reply may call
    allow_text: bool  # tool_choice auto: `no_tool` is a candidate too
    parallel: bool
    no_tool: str = NO_TOOL

    def schema(self) -> dict:
        """The JSON schema of a reply: an array of calls to the candidates."""
        def call(name: str, parameters: dict) -> dict:
            return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
                    "required": ["name", "arguments"], "additionalProperties": False}
        calls = [call(f.name, f.parameters) for f in self.candidates]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        many = {"type": "array", "items": items, "minItems": 1,
                "maxItems": MAX_PARALLEL_CALLS if self.parallel else 1}
        if not self.allow_text:
            return many
        decline = {"type": "array", "minItems": 1, "maxItems": 1,
                   "items": call(self.no_tool, {"type": "object", "properties": {}, "additionalProperties": False})}
        return {"anyOf": [many, decline]}

    def prompt(self, with_list: bool) -> str:
        """The instruction added to the conversation; the function list too unless the chat
        template shows the tools itself."""
        text = _PROMPT % self.no_tool if self.allow_text else _PROMPT.split(" If none")[0]
        if with_list:
            listed = [{"name": f.name, "description": f.description, "parameters": f.parameters}
                      for f in self.functions]
            if self.allow_text:
                listed.append({"name": self.no_tool, "description": "None of the functions fits: answer "
                               "in plain text instead", "parameters": {}})
            text += "\nFunctions:\n" + json.dumps(listed, ensure_ascii=False)
        return text

    def template_tools(self) -> list[dict]:
        return [{"type": "function", "function": {"name": f.name, "description": f.description or "",
                                                  "parameters": f.parameters}} for f in self.functions]


def plan_tools(tools: list[dict] | None, tool_choice, parallel_tool_calls: bool | None) -> ToolPlan | None:
    """None when the reply is ordinary text (no tools, or tool_choice "none")."""
    if tool_choice is not None and not tools:
        raise tool_error("`tool_choice` needs `tools`", "tool_choice")
    if not tools:
        return None
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
                tool.get("function"), dict):
            raise tool_error(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                             f'"parameters": {{...}}}}}}')
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(
                c.isalnum() or c in "_-" for c in name):
            raise tool_error(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'. Given: {name!r}")
        params = fn.get("parameters", fn.get("arguments")) or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise tool_error(f"tools[{i}].function.parameters must be a JSON schema object")
        if params.get("type") == "object" and "additionalProperties" not in params:
            # Only the declared arguments (as OpenAI's strict mode and TGI do): without this a
            # small model pads calls with keys the function does not take.
            params = {**params, "additionalProperties": False}
        if any(f.name == name for f in functions):
            raise tool_error(f"two tools are named {name!r}")
        functions.append(Function(name, fn.get("description"), params))
    no_tool = NO_TOOL
    while any(f.name == no_tool for f in functions):
        no_tool = "_" + no_tool
    parallel = parallel_tool_calls is not False
    choice = tool_choice if tool_choice is not None else "auto"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise tool_error('`tool_choice` must be "auto", "none", "required" or '
                             '{"type": "function", "function": {"name": ...}}', "tool_choice")
        choice = fn["name"]
    if choice == "none":
        return None
    if choice == "auto":
        return ToolPlan(functions, functions, True, parallel, no_tool)
    if choice == "required":
        return ToolPlan(functions, functions, False, parallel, no_tool)
    named = [f for f in functions if f.name == choice]
    if not named:
        raise tool_error(f"Tool with name {choice!r} not found (tools: {[f.name for f in functions]})",
                         "tool_choice")
    return ToolPlan(functions, named, False, False, no_tool)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ---- reading the reply ----

def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """Index after the JSON string starting at text[i] == '"', or None if it is still open."""
    i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """Index after the JSON value starting at text[i], or None if it is still incomplete. Only
    bracket balance and strings matter: the grammar already guarantees well-formed JSON."""
    if i >= len(text):
        return None
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] not in "[{":
        j = i
        while j < len(text) and text[j] not in ",]} \t\r\n":
            j += 1
        return j if j < len(text) else None
    depth = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _string_end(text, i)
            if end is None:
                return None
            i = end
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


@dataclass
class PartialCall:
    name: str | None = None  # known once its string is complete
    arguments: str = ""  # the raw JSON text of the arguments so far
    complete: bool = False


def scan_calls(text: str) -> list[PartialCall]:
    """The calls in a (possibly unfinished) reply `[{"name": ..., "arguments": ...}, ...]`."""
    calls: list[PartialCall] = []
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        return calls
    i += 1
    while True:
        i = _skip_ws(text, i)
        if i >= len(text) or text[i] != "{":
            return calls
        call = PartialCall()
        calls.append(call)
        i = _skip_ws(text, i + 1)
        # "name": "<name>"
        end = _string_end(text, i) if i < len(text) else None
        if end is None:
            return calls
        i = _skip_ws(text, end)
        if i >= len(text) or text[i] != ":":
            return calls
        i = _skip_ws(text, i + 1)
        end = _string_end(text, i) if i < len(text) else None
        if end is None:
            return calls
        call.name = json.loads(text[i:end])
        i = _skip_ws(text, end)
        if i >= len(text) or text[i] != ",":
            return calls
        i = _skip_ws(text, i + 1)
        end = _string_end(text, i) if i < len(text) else None  # "arguments"
        if end is None:
            return calls
        i = _skip_ws(text, end)
        if i >= len(text) or text[i] != ":":
            return calls
        start = i = _skip_ws(text, i + 1)
        end = _value_end(text, i)
        call.arguments = text[start:end if end is not None else len(text)]
        if end is None:
            return calls
        call.complete = True
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == "}":
            i += 1
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i += 1


def parse_calls(text: str) -> list[tuple[str, str]] | None:
    """(name, arguments JSON text as the model wrote it) per call of a finished reply; None if
    the reply is not a complete array of calls (e.g. cut short by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = scan_calls(text)
    if not isinstance(value, list) or not value or len(calls) != len(value):
        return None
    if not all(c.complete and c.name is not None for c in calls):
        return None
    return [(c.name, c.arguments) for c in calls]


@dataclass
class CallStreamer:
    """Turns a growing reply into OpenAI `tool_calls` deltas: per call, first its id and name,
    then fragments of its arguments' JSON text."""

    text: str = ""
    sent_args: list[int] = field(default_factory=list)  # characters of arguments sent, per call
    ids: list[str] = field(default_factory=list)

    def feed(self, delta: str) -> tuple[list[dict], str | None]:
        """(tool_call deltas now final, the first call's name once known)."""
        self.text += delta
        calls = scan_calls(self.text)
        out = []
        for index, call in enumerate(calls):
            if call.name is None:
                break
            if index == len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                out.append({"index": index, "id": self.ids[index], "type": "function",
                            "function": {"name": call.name, "arguments": ""}})
            # Hold back a trailing part that may still change (an unfinished scalar); strings and
            # brackets never change once written.
            args = call.arguments if call.complete else call.arguments.rstrip()
            if len(args) > self.sent_args[index]:
                out.append({"index": index, "function": {"arguments": args[self.sent_args[index]:]}})
                self.sent_args[index] = len(args)
        return out, calls[0].name if calls and calls[0].name is not None else None
