"""The EngineClient over vLLM (ENGINE=vllm): generation, health and stats from VllmEngine (vLLM's
AsyncLLM on its loop thread), the text side (tokenizer, chat template, llguidance grammars) from
sagellm.engine.text as for our own engine, so the API layer cannot tell the two apart."""

from __future__ import annotations

import time

from sagellm.engine.client import EngineStats, Health, Limits, ModelInfo, RequestStream
from sagellm.engine.sampling_params import SamplingParams
from sagellm.engine.text import TextClient
from sagellm.engine.vllm.engine import VllmEngine
from sagellm.errors import ValidationError


class VllmEngineClient(TextClient):
    def __init__(self, engine: VllmEngine, *, model: ModelInfo, limits: Limits, tokenizer, chat,
                 grammars=None, watchdog_timeout_s: float = 60.0):
        super().__init__(tokenizer, chat, grammars)
        self.engine = engine
        self.model = model
        self.limits = limits
        self._watchdog_s = watchdog_timeout_s

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> RequestStream:
        return self.engine.submit(prompt_ids, params, request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def adapter_names(self) -> tuple[str, ...]:
        return () if self.engine.adapters is None else self.engine.adapters.names()

    def load_adapter(self, name: str, src: str) -> None:
        from sagellm.model.lora import AdapterError, locate

        if self.engine.adapters is None:
            super().load_adapter(name, src)
        try:
            self.engine.adapters.add(name, locate(name, src))
        except AdapterError as exc:  # the client's adapter, not the server's fault
            raise ValidationError(exc.message, param="src") from None

    def unload_adapter(self, name: str) -> None:
        if self.engine.adapters is None:
            super().unload_adapter(name)
        self.engine.adapters.remove(name)  # vLLM drops it before the next adapter request is added

    def health(self) -> Health:
        if not self.engine.is_alive():
            return Health(False, False, "the vLLM engine core stopped")
        stalled = time.monotonic() - self.engine.last_progress
        if self.engine.num_pending() and stalled > self._watchdog_s:
            return Health(True, False, f"vLLM made no progress for {stalled:.0f}s with work queued")
        return Health(True, True)

    def stats(self) -> EngineStats:
        s = self.engine.stats()
        # vLLM's scheduler figures come with its outputs, so they keep the last batch's after the
        # last request ends (aborted, or finished alone): with none of ours pending, none run.
        waiting, running = (s["queue"], s["batch"]) if self.engine.num_pending() else (0, 0)
        # vLLM reports the share of its blocks in use; the blocks are its own (16 tokens on CPU).
        adapters = self.engine.adapters
        return EngineStats(num_waiting=waiting, num_running=running, num_steps=s["steps"],
                           prefix_query_tokens=s["prefix_query"], prefix_hit_tokens=s["prefix_hit"],
                           kv_blocks_used=round(s["kv_usage"] * s["kv_blocks"]), kv_blocks_total=s["kv_blocks"],
                           adapters_resident=len(adapters.resident()) if adapters else 0,
                           adapters_running=adapters.running() if adapters else {})

    def shutdown(self) -> None:
        self.engine.stop()
