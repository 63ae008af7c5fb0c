"""The EngineClient over sagellm's own engine, in this process: the LLMEngine's loop thread (and
its tensor-parallel ranks, if any), with the text side of sagellm.engine.text."""

from __future__ import annotations

import time

from sagellm.engine.client import EngineStats, Health, Limits, ModelInfo, RequestStream
from sagellm.engine.engine import LLMEngine
from sagellm.engine.sampling_params import SamplingParams
from sagellm.engine.text import TextClient
from sagellm.errors import ValidationError
from sagellm.model.lora import AdapterError, locate


class SagellmEngineClient(TextClient):
    def __init__(self, engine: LLMEngine, *, model: ModelInfo, limits: Limits, tokenizer, chat,
                 grammars=None, watchdog_timeout_s: float = 60.0, tp_group=None, adapters=None):
        super().__init__(tokenizer, chat, grammars)
        self.engine = engine
        self.model = model
        self.limits = limits
        self._watchdog_s = watchdog_timeout_s
        self._tp = tp_group  # sagellm.engine.distributed.TPGroup, or None
        self._adapters = adapters  # sagellm.engine.adapters.AdapterRegistry, or None: LoRA serving is off

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> RequestStream:
        return self.engine.submit(prompt_ids, params, request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def adapter_names(self) -> tuple[str, ...]:
        return () if self._adapters is None else self._adapters.names()

    def load_adapter(self, name: str, src: str) -> None:
        if self._adapters is None:
            super().load_adapter(name, src)
        try:
            self._adapters.add(name, locate(name, src))
        except AdapterError as exc:  # the client's adapter, not the server's fault
            raise ValidationError(exc.message, param="src") from None

    def unload_adapter(self, name: str) -> None:
        if self._adapters is None:
            super().unload_adapter(name)
        self._adapters.remove(name)

    def health(self) -> Health:
        dead = self._tp.dead_followers() if self._tp is not None else []
        if dead:  # a rank can never rejoin the group
            return Health(False, False, f"tensor-parallel rank(s) {dead} exited")
        if not self.engine.is_alive():
            return Health(False, False, "the engine stopped")
        stalled = time.monotonic() - self.engine.last_progress
        if self.engine.num_pending() and stalled > self._watchdog_s:
            return Health(True, False, f"the engine made no progress for {stalled:.0f}s with work queued")
        return Health(True, True)

    def stats(self) -> EngineStats:
        e, sched = self.engine, self.engine.scheduler
        alloc = e.cache.allocator
        return EngineStats(num_waiting=len(sched.waiting), num_running=len(sched.running), num_steps=e.num_steps,
                           phase_seconds=dict(e.phase_seconds), prefix_query_tokens=sched.prefix_query_tokens,
                           prefix_hit_tokens=sched.prefix_hit_tokens,
                           kv_blocks_used=alloc.num_blocks - alloc.num_free, kv_blocks_total=alloc.num_blocks,
                           adapters_resident=len(self._adapters.resident()) if self._adapters else 0,
                           adapters_running=self._adapters.running() if self._adapters else {})

    def shutdown(self) -> None:
        self.engine.stop()
        if self._tp is not None:
            self._tp.shutdown()
