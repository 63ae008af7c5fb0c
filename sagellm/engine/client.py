"""EngineClient: everything the API layer knows of an engine, and the typed values it returns.

Torch-free, so the API layer can import it. One implementation runs sagellm's own engine in this
process (sagellm.engine.sagellm_client); another may drive an engine elsewhere (vLLM's, whose core
runs in its own process) by feeding each request's QueueStream from its own thread.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import NotFound, Unavailable, ValidationError


@dataclass(frozen=True)
class Limits:
    """Token limits in force (from the settings, or derived from the model and the memory)."""

    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int  # KV cache capacity, in tokens
    max_batch_size: int


@dataclass(frozen=True)
class ModelInfo:
    model_id: str  # as the user named it (hub id or folder)
    served_name: str  # what clients see as `model`
    device: str  # "cpu" or "cuda"
    dtype: str  # "bfloat16", "float32", ...
    # Prompt token ids must be below it: the tokenizer's and the model's embedding's size, the smaller.
    vocab_size: int


@dataclass(frozen=True)
class Health:
    alive: bool  # the engine runs (a dead one never recovers)
    progressing: bool  # it completed a step within WATCHDOG_TIMEOUT_S, or has nothing to do
    reason: str = "ok"  # why not, for /ping's body

    @property
    def ok(self) -> bool:
        return self.alive and self.progressing


@dataclass(frozen=True)
class EngineStats:
    """Counters for /metrics, read at scrape time."""

    num_waiting: int  # requests queued for their first step
    num_running: int  # requests in the running batch
    num_steps: int  # steps run since start
    phase_seconds: Mapping[str, float] = field(default_factory=dict)  # per step phase, summed since start
    prefix_query_tokens: int = 0  # prompt tokens of admitted requests
    prefix_hit_tokens: int = 0  # ... of which the prefix cache held the K/V
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    adapters_resident: int = 0  # LoRA adapters in memory
    adapters_running: Mapping[str, int] = field(default_factory=dict)  # sequences running per adapter


class TokenSpan(NamedTuple):
    token_id: int
    start: int  # character offsets in the text
    end: int


class CompiledGrammar(Protocol):
    """What compile_grammar returns, for SamplingParams.grammar (sagellm.engine.constraint.Grammar)."""

    description: str  # its kind: json_schema, json_object, regex or lark
    source: str  # llguidance's grammar text, for an engine that runs its own matcher


class EngineDead(Unavailable):
    """The engine stopped (it died, or the server is stopping) while a request needed it: 503, the
    answer of a server that cannot serve, never a request's own failure."""


class RequestStream(ABC):
    """One submitted request: iterate it for its TokenEvents; the last one has finish_reason set.
    Aborting is safe at any time, also after the end."""

    request_id: str
    prompt_len: int
    seed: int | None  # the seed a sampled request runs with (drawn when it gave none)

    @abstractmethod
    def iter_events(self, idle_s: float | None = None) -> Iterator[TokenEvent | None]:
        """TokenEvents until the request ends; with `idle_s`, None whenever nothing came for that
        long (a stream sends a keep-alive)."""

    @abstractmethod
    def abort(self) -> None: ...

    def __iter__(self) -> Iterator[TokenEvent]:
        return (e for e in self.iter_events() if e is not None)


class QueueStream(RequestStream):
    """A RequestStream fed through a queue by the engine's own thread: TokenEvents, then None."""

    _POLL_S = 0.5

    def __init__(self, request_id: str, prompt_len: int, seed: int | None, events: queue.SimpleQueue,
                 engine_alive: Callable[[], bool], abort: Callable[[], None]):
        self.request_id, self.prompt_len, self.seed = request_id, prompt_len, seed
        self._events, self._alive, self._abort = events, engine_alive, abort

    def iter_events(self, idle_s: float | None = None) -> Iterator[TokenEvent | None]:
        waited = 0.0
        while True:
            try:
                event = self._events.get(timeout=self._POLL_S)
            except queue.Empty:
                if not self._alive():
                    raise EngineDead("the engine stopped while this request was running") from None
                waited += self._POLL_S
                if idle_s is not None and waited >= idle_s:
                    waited = 0.0
                    yield None
                continue
            waited = 0.0
            if event is None:
                return
            if event.finish_reason == FinishReason.ERROR and not self._alive():
                # The engine failed every request as it died: the server's failure, not this request's.
                raise EngineDead(f"the engine stopped: {event.error}")
            yield event

    def abort(self) -> None:
        self._abort()


class EngineClient(ABC):
    """The engine as the API layer sees it: generation (submit, abort), its state (health,
    stats), and the model's text side (tokenizer, chat template, grammars for constrained
    decoding), with its limits and identity."""

    model: ModelInfo
    limits: Limits

    # ---- generation ----

    @abstractmethod
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> RequestStream:
        """Queue a request (params already validated); raises EngineDead when the engine is gone."""

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters a request may name (SamplingParams.adapter); none unless the engine
        serves adapters."""
        return ()

    def load_adapter(self, name: str, src: str) -> None:
        """Register a LoRA adapter from a folder or hub id; raises ValidationError for a bad one."""
        raise ValidationError(f"cannot load adapter `{name}`: LoRA serving is off (set MAX_LORAS or LORA_ADAPTERS)",
                              param="name")

    def unload_adapter(self, name: str) -> None:
        """Unregister an adapter once the requests running on it have finished."""
        raise NotFound(f"adapter `{name}` is not loaded (LoRA serving is off)", param="name")

    @abstractmethod
    def health(self) -> Health: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine; requests still running end with FinishReason.ERROR."""

    # ---- the model's text side ----

    @abstractmethod
    def tokenize(self, text: str, add_special_tokens: bool = True, last: int | None = None) -> list[int]:
        """Token ids of `text`; with `last`, only its last `last` ones (TGI's truncate), found by
        tokenizing only a tail of the text where that gives the same ones."""

    @abstractmethod
    def tokens_over(self, text: str, limit: int) -> int | None:
        """A number of tokens `text` has at least, found without tokenizing it, when that is more
        than `limit`; None when it is not, or the tokenizer gives no such bound."""

    @abstractmethod
    def tokenize_with_offsets(self, text: str, last: int | None = None) -> list[TokenSpan]:
        """Tokens of `text` as the native API counts them (special tokens added); `last` as in
        tokenize()."""

    @abstractmethod
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of the ids, special tokens left out unless asked for."""

    @property
    @abstractmethod
    def template_shows_tools(self) -> bool:
        """The chat template renders a `tools` list itself."""

    @abstractmethod
    def render_chat(self, messages: list[dict], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    kwargs: dict | None = None) -> str:
        """The conversation through the chat template; raises TemplateError."""

    @abstractmethod
    def encode_chat(self, prompt: str) -> list[int]:
        """Token ids of a rendered conversation, with exactly one BOS."""

    @property
    @abstractmethod
    def supports_grammar(self) -> bool:
        """Constrained decoding is available (not DISABLE_GRAMMAR_SUPPORT)."""

    @abstractmethod
    def compile_grammar(self, kind: str, value: object, param: str) -> CompiledGrammar:
        """A grammar for SamplingParams.grammar. kind: json_schema, json_object, regex or lark;
        raises a ValidationError naming `param` when it cannot compile."""
