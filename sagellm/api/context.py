"""What the API layer needs from the model and engine, as plain callables (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from sagellm.engine.sampling_params import SamplingParams
from sagellm.settings import Settings


class Handle(Protocol):
    request_id: str
    prompt_len: int
    seed: int | None

    def iter_events(self, idle_s: float | None = None): ...
    def abort(self) -> None: ...


@dataclass
class ServingContext:
    settings: Settings
    model_id: str
    served_name: str
    device: str
    dtype: str
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int
    # text -> ids; add_special_tokens as the native API does (BOS etc.)
    tokenize: Callable[[str, bool], list[int]]
    # text -> [(id, char_start, char_end)] with the tokenizer's own special tokens
    tokenize_offsets: Callable[[str], list[tuple[int, int, int]]]
    decode: Callable[[list[int]], str]  # skips special tokens
    render_chat: Callable[..., str]  # messages, tools=, add_generation_prompt=, continue_final_message=, kwargs=
    encode_chat: Callable[[str], list[int]]  # rendered prompt -> ids with exactly one BOS
    submit: Callable[[list[int], SamplingParams], Handle]
    # (kind, value, param name) -> a compiled grammar for SamplingParams.grammar; None: unavailable
    compile_grammar: Callable[[str, object, str], object] | None = None
    template_shows_tools: bool = False  # the chat template renders a `tools` list itself
