"""vLLM's V1 AsyncLLM in process (its engine core in its own process, as vLLM runs it), driven
from one asyncio event-loop thread and bridged to synchronous callers: `submit` returns a
QueueStream the loop thread fills, as sagellm's engine does; `abort`, `is_alive`, `num_pending`,
`last_progress`, `stats`, `limits` and `stop` are what VllmEngineClient reads."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time
import uuid

from sagellm.engine.client import EngineDead, QueueStream
from sagellm.engine.events import FinishReason
from sagellm.engine.sampling_params import SamplingParams
from sagellm.engine.vllm.lora import lora_request
from sagellm.engine.vllm.params import ENGINE, check_supported, to_vllm
from sagellm.engine.vllm.request import VllmRequest
from sagellm.errors import NotFound, Unavailable, ValidationError

log = logging.getLogger(__name__)


class VllmEngine:
    def __init__(self, engine_args, tokenizer, eos_token_ids: tuple[int, ...], vocab_size: int, adapters=None):
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self._args = engine_args
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._llm = None
        self._requests: dict[str, VllmRequest] = {}
        self._stopping = False
        self.last_progress = time.monotonic()
        self.num_steps = 0  # engine-core iterations reported (sagellm_engine_steps)
        self._sched = {"queue": 0, "batch": 0, "prefix_query": 0, "prefix_hit": 0, "kv_usage": 0.0}
        self.adapters = adapters  # sagellm.engine.adapters.AdapterRegistry, or None: LoRA serving is off
        self._in_vllm: set[int] = set()  # uids of the adapters added to vLLM and not yet removed
        self._add_lock = asyncio.Lock()

    # ---- lifecycle ----

    def start(self) -> None:
        """Start the loop thread and vLLM on it; returns once vLLM is loaded (raises if it fails)."""
        self._thread = threading.Thread(target=self._loop.run_forever, name="sagellm-vllm", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._create(), self._loop).result()

    async def _create(self) -> None:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        # As `vllm serve` resolves them: the batch defaults vLLM picks per device (max_num_seqs,
        # max_num_batched_tokens; 1024 and 8192 on an H100 against 128 and 2048 for other contexts)
        # depend on it, and sagellm is an API server as vLLM's own is.
        config = self._args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        # Our own stat logger only: vLLM's default ones log every few seconds and run a
        # Prometheus registry of their own; /metrics reads `stats()`.
        self._llm = AsyncLLM.from_vllm_config(config, stat_loggers=[self._stat_logger()],
                                              disable_log_stats=True)

    def stop(self, timeout: float = 30.0) -> None:
        """End every request (as our engine does at shutdown) and shut vLLM's processes down."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._stopping = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
        except Exception:  # a hung shutdown must not keep the worker from exiting
            log.exception("vLLM shutdown failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    async def _shutdown(self) -> None:
        tasks = [r.task for r in self._requests.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._llm is not None:
            self._llm.shutdown()

    def is_alive(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and self._llm is not None
                and not self._llm.errored and not self._stopping)

    def num_pending(self) -> int:
        return len(self._requests)

    # ---- requests (any thread but the loop's) ----

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> QueueStream:
        if not self.is_alive():
            raise EngineDead("the engine is not running")
        check_supported(params)
        if params.do_sample and params.seed is None:
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        req = VllmRequest(request_id or uuid.uuid4().hex, prompt_ids, params, self.tokenizer, self._special_ids)
        vllm_params = to_vllm(params, self.vocab_size)
        if params.adapter is not None:
            if self.adapters is None:
                raise NotFound(f"adapter `{params.adapter}` is not loaded (LoRA serving is off)", param="adapter_id")
            req.lora = self.adapters.acquire(params.adapter)  # released when the request ends (_pump)
        # Wait for vLLM to take it, so a request it refuses is refused here, before any output.
        future = asyncio.run_coroutine_threadsafe(self._add(req, vllm_params), self._loop)
        from vllm.exceptions import VLLMClientError

        try:
            future.result()
        except (VLLMClientError, ValueError) as exc:  # the request's fault: 422, as ours would be
            message = exc.args[0] if exc.args else str(exc)
            raise ValidationError(f"Input validation error: {message} ({ENGINE})",
                                  param=getattr(exc, "parameter", None)) from None
        except Exception as exc:
            if not self.is_alive():
                raise EngineDead(f"the vLLM engine stopped: {type(exc).__name__}") from exc
            raise
        finally:
            if req.task is None:  # not taken: no _pump to release its adapter
                self._release(req)
        return QueueStream(req.request_id, len(prompt_ids), params.seed if params.do_sample else None, req.events,
                           self.is_alive, lambda: self.abort(req.request_id))

    def abort(self, request_id: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._cancel, request_id)
        except RuntimeError:  # the loop has stopped: nothing is running
            pass

    # ---- the loop thread ----

    async def _add(self, req: VllmRequest, vllm_params) -> None:
        from vllm.inputs.engine import tokens_input

        async with self._add_lock:
            lora = None
            if req.lora is not None:
                await self._sync_loras()
                lora = lora_request(req.lora)
                if req.lora.uid not in self._in_vllm:
                    await self._load_lora(lora)
            collector = await self._llm.add_request(req.request_id, tokens_input(req.prompt_ids), vllm_params,
                                                    lora_request=lora)
        self._requests[req.request_id] = req
        req.task = asyncio.create_task(self._pump(req, collector))

    async def _pump(self, req: VllmRequest, collector) -> None:
        """vLLM's outputs for one request -> its events, until it ends; a request we end (stop
        string, deadline, abort) is aborted in vLLM too."""
        ended_by_vllm = False
        try:
            while not req.finished:
                out = collector.get_nowait() or await collector.get()
                self.last_progress = time.monotonic()
                ended_by_vllm = out.finished
                req.feed(out)
        except asyncio.CancelledError:
            if self._stopping:
                req.end(FinishReason.ERROR, "the server is shutting down")
            else:
                req.end(FinishReason.ABORTED)
        except Exception as exc:  # the engine core died, or a bug here: this request fails alone
            if self._llm.errored:
                req.end(FinishReason.ERROR, "the vLLM engine core stopped")
            else:
                log.exception("vLLM request %s failed", req.request_id)
                req.end(FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self._requests.pop(req.request_id, None)
            if not ended_by_vllm and not self._llm.errored:
                await self._llm.abort(collector.request_id, internal=True)
            collector.close()
            self._release(req)

    async def _sync_loras(self) -> None:
        """Remove from vLLM every adapter the registry no longer holds resident (swapped out or
        unregistered; none has a request running), so at most MAX_LORAS are active there and the
        slot base-model rows read stays empty (sagellm.engine.vllm.lora)."""
        resident = {w.uid for w in self.adapters.resident_weights()}
        for uid in sorted(self._in_vllm - resident):
            await self._llm.remove_lora(uid)
            self._in_vllm.discard(uid)

    async def _load_lora(self, lora) -> None:
        """Have vLLM read the adapter now, as a call of its own: one it cannot load (its files
        changed since they were checked, or something vLLM refuses) fails this request alone; read
        inside an engine step, the failure would stop vLLM's engine core."""
        try:
            await self._llm.add_lora(lora)
        except Exception as exc:
            if self._llm.errored:
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise Unavailable(f"adapter `{lora.lora_name}` could not be loaded by vLLM: {type(exc).__name__}: "
                              f"{first}") from None
        self._in_vllm.add(lora.lora_int_id)

    def _release(self, req: VllmRequest) -> None:
        if req.lora is not None:
            self.adapters.release(req.lora)
            req.lora = None

    def _cancel(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None and req.task is not None and not req.task.done():
            req.task.cancel()

    # ---- numbers for /info and /metrics ----

    def limits(self) -> dict[str, int]:
        """What vLLM resolved: context, prefill chunk, batch size and KV capacity in tokens."""
        cfg = self._llm.vllm_config
        blocks = cfg.cache_config.num_gpu_blocks or 0
        return {"max_total_tokens": cfg.model_config.max_model_len,
                "max_batch_prefill_tokens": cfg.scheduler_config.max_num_batched_tokens,
                "max_batch_size": cfg.scheduler_config.max_num_seqs,
                "max_batch_total_tokens": blocks * cfg.cache_config.block_size}

    @property
    def dtype(self):
        return self._llm.vllm_config.model_config.dtype

    def stats(self) -> dict[str, int | float]:
        """queue, batch (requests waiting / running in vLLM's scheduler), steps, prefix_query and
        prefix_hit (prompt tokens looked up / found in the prefix cache, summed), kv_usage (the
        share of KV cache blocks in use), kv_blocks (their number)."""
        return {**self._sched, "steps": self.num_steps, "kv_blocks": self._llm.vllm_config.cache_config.num_gpu_blocks or 0}

    def _stat_logger(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class Recorder(StatLoggerBase):
            """vLLM calls `record` on the loop thread once per engine-core output batch."""

            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if iteration_stats is not None:
                    engine.num_steps += 1
                if scheduler_stats is not None:
                    s = engine._sched
                    s["queue"], s["batch"] = scheduler_stats.num_waiting_reqs, scheduler_stats.num_running_reqs
                    s["prefix_query"] += scheduler_stats.prefix_cache_stats.queries
                    s["prefix_hit"] += scheduler_stats.prefix_cache_stats.hits
                    s["kv_usage"] = scheduler_stats.kv_cache_usage

            def log_engine_initialized(self):
                pass

        return Recorder
