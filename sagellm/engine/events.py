"""What the engine streams back per request (no torch here: the API layer reads these)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORTED = "aborted"
    ERROR = "error"


@dataclass
class TopToken:
    token_id: int
    text: str
    logprob: float
    special: bool


@dataclass
class PromptToken:
    """One prompt token with the logprob the model gave it from the tokens before it (None for
    the first, which has no context), and the most likely tokens at its place
    (SamplingParams.prompt_top_n of them; none for the first)."""

    token_id: int
    text: str
    logprob: float | None
    top_tokens: list[TopToken] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One generated token. `text` is the token's own text (special tokens kept, TGI style);
    `delta` is the content text that became final with this token (stop strings withheld and
    trimmed, special tokens dropped, OpenAI style). `finish_reason` is set on the last event."""

    index: int
    token_id: int
    text: str
    logprob: float | None  # None unless the request asked for logprobs
    special: bool
    delta: str
    top_tokens: list[TopToken] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended generation
    error: str | None = None
    # Every prompt token, on the first event of a request with SamplingParams.prompt_logprobs (a
    # request with max_new_tokens 0 gets one event, token_id -1, finish_reason LENGTH).
    prompt_logprobs: list[PromptToken] | None = None
    # On the first event: seconds from submit until the engine first scheduled the request (for
    # /metrics' queue time; None from an engine that does not say).
    queue_s: float | None = None
