"""Response shapes of TGI's native API: /generate, /generate_stream, /tokenize, /info.

A field typed `... | MISSING` is left out of the JSON unless given; every other field is always
written (None as null), as TGI writes them.
"""

from __future__ import annotations

from pydantic import MISSING, BaseModel


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None  # None for the first token, which has no context


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | MISSING = MISSING


class Details(BaseModel):
    finish_reason: str  # "length", "eos_token" or "stop_sequence"
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | MISSING = MISSING  # when top_n_tokens was asked for
    best_of_sequences: list[BestOfSequence] | MISSING = MISSING  # the other sequences of best_of


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | MISSING = MISSING


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamChunk(BaseModel):
    """One token of /generate_stream; the last one carries the whole text (and details)."""

    index: int
    token: Token
    top_tokens: list[Token] | MISSING = MISSING
    generated_text: str | None = None
    details: StreamDetails | None = None


class TokenizedToken(BaseModel):
    id: int
    text: str
    start: int  # byte offsets in the UTF-8 input
    stop: int


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_pipeline_tag: str = "text-generation"
    model_dtype: str
    model_device_type: str
    served_model_name: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int
    max_top_n_tokens: int
    max_client_batch_size: int
    max_choices: int
    grammar_support: bool
    validation_workers: int = 1
    router: str = "sagellm"
    version: str
    sha: str | None = None
    docker_label: str | None = None
    invocations_actions: list[str] | MISSING = MISSING  # {"action": "info"} on /invocations
