"""A request's state inside the engine, and the events it streams back."""

from __future__ import annotations

import enum
import queue
import time
from functools import cached_property

import torch

from sagellm.engine.detokenizer import StopMatcher
from sagellm.engine.events import TokenEvent
from sagellm.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    """Prompt and generated ids, KV blocks, sampler state and the outbound event queue."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, detokenizer,
                 lora=None):
        self.request_id = request_id
        # The LoRA adapter this sequence runs with (sagellm.model.lora.LoraWeights), or None: the
        # base model. Its prefix-cache keys start from the adapter's load, never shared with others.
        self.lora = lora
        self.cache_root = None if lora is None else ("lora", lora.uid)
        self.lora_held = lora is not None  # counted as running on it (sagellm.engine.adapters)
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.arrival = time.monotonic()
        self.queue_s: float | None = None  # arrival -> first scheduled, set by the scheduler
        self.block_table: list[int] = []
        # Prefix caching: the keys of this sequence's full blocks computed so far, and how many
        # of its blocks are registered in the cache (sagellm.engine.kv_cache).
        self.block_keys: list = []
        self.num_registered = 0
        # Tokens whose K/V are in the cache. After a preemption this drops to 0 and the prompt
        # plus the output so far is prefilled again.
        self.num_computed = 0
        self.detokenizer = detokenizer  # sagellm.engine.detokenizer.make_detokenizer
        self.stop_matcher = StopMatcher(params.stop)
        self.events: queue.SimpleQueue[TokenEvent | None] = queue.SimpleQueue()
        # Constrained decoding state (sagellm.engine.constraint.Matcher), one per sequence.
        self.matcher = params.grammar.matcher() if params.grammar is not None else None

    @cached_property
    def unique_prompt_ids(self) -> torch.Tensor:
        """The prompt's distinct token ids (int32), for the repetition penalty; made once."""
        return torch.unique(torch.tensor(self.prompt_ids, dtype=torch.int32))

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
