"""Request shapes of the TGI native API and the OpenAI API (responses are built in tgi.py / openai.py).

Unknown fields are ignored, as TGI and OpenAI do; explicit nulls mean "unset". Pydantic's lax
mode coerces "50" to 50 and "true" to True, which SageMaker Studio's test box relies on.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- TGI native ----

class GenerateParameters(_Lenient):
    do_sample: bool | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # vLLM's (and transformers'); not in TGI
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    truncate: int | None = None
    return_full_text: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    top_n_tokens: int | None = None
    best_of: int | None = None
    watermark: bool | None = None
    grammar: dict | None = None
    adapter_id: str | None = None
    # vLLM's names, for benchmarks that need exact output lengths.
    min_new_tokens: int | None = None
    ignore_eos: bool | None = None


class GenerateRequest(_Lenient):
    inputs: str
    parameters: GenerateParameters | None = None
    stream: bool | None = None


# ---- OpenAI ----

class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class OtherPart(_Lenient):
    type: str


class ChatMessage(_Lenient):
    role: str
    content: Union[str, list[Union[TextPart, OtherPart]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class OpenAISampling(_Lenient):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None  # vLLM's extension, as its clients send it (extra_body)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    tool_prompt: str | None = None  # TGI's: replaces the instruction that introduces the tools
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None


class CompletionRequest(OpenAISampling):
    # A text, several, a list of token ids or several such lists (OpenAI's spec). Pydantic's smart
    # union takes the exact match first, so ["12"] stays text and [12] ids.
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
