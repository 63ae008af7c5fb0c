"""Response shapes of the OpenAI API: chat completions (whole and chunks), completions (whole and
chunks), logprobs in both dialects, usage, the model list.

A field typed `... | MISSING` is left out of the JSON unless given; every other field is always
written (None as null).
"""

from __future__ import annotations

from typing import Literal

from pydantic import MISSING, BaseModel


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# ---- chat ----

class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class LogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[LogprobEntry]


class FunctionCall(BaseModel):
    name: str | None
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    id: str | None
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | MISSING = MISSING


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str  # "stop", "length" or "tool_calls"
    stop_reason: str | int | None  # the stop string or token id that ended it


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | MISSING = MISSING
    arguments: str


class ToolCallDelta(BaseModel):
    """A call's first delta has its id, type and name; the next ones more of its arguments."""

    index: int
    id: str | MISSING = MISSING
    type: Literal["function"] | MISSING = MISSING
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | MISSING = MISSING
    content: str | MISSING = MISSING
    tool_calls: list[ToolCallDelta] | MISSING = MISSING


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None | MISSING = MISSING  # with the finish_reason


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None | MISSING = MISSING  # with stream_options.include_usage: null, then the totals


# ---- completions ----

class CompletionLogprobs(BaseModel):
    """The legacy dialect: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None]]
    text_offset: list[int]  # characters into the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None | MISSING = MISSING


class Completion(BaseModel):
    """A whole completion, or one chunk of a streamed one (the same shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | MISSING = MISSING


# ---- models ----

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sagellm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
