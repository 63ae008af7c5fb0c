"""The EngineClient over sagellm's own engine, in this process: the LLMEngine's loop thread (and
its tensor-parallel ranks, if any), with the text side of sagellm.engine.text."""

from __future__ import annotations

import time

from sagellm.engine.client import EngineStats, Health, Limits, ModelInfo, RequestStream
from sagellm.engine.engine import LLMEngine
from sagellm.engine.sampling_params import SamplingParams
from sagellm.engine.text import TextClient


class SagellmEngineClient(TextClient):
    def __init__(self, engine: LLMEngine, *, model: ModelInfo, limits: Limits, tokenizer, chat,
                 grammars=None, watchdog_timeout_s: float = 60.0, tp_group=None):
        super().__init__(tokenizer, chat, grammars)
        self.engine = engine
        self.model = model
        self.limits = limits
        self._watchdog_s = watchdog_timeout_s
        self._tp = tp_group  # sagellm.engine.distributed.TPGroup, or None

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> RequestStream:
        return self.engine.submit(prompt_ids, params, request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

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
                           kv_blocks_used=alloc.num_blocks - alloc.num_free, kv_blocks_total=alloc.num_blocks)

    def shutdown(self) -> None:
        self.engine.stop()
        if self._tp is not None:
            self._tp.shutdown()
