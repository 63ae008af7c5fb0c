"""The engine loop: one background thread runs batched steps; callers submit requests from any
thread and read their token events from a per-request queue."""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from sagellm.engine.client import EngineDead, QueueStream
from sagellm.engine.detokenizer import make_detokenizer
from sagellm.engine.events import FinishReason, PromptToken, TokenEvent
from sagellm.engine.kv_cache import PagedKVCache
from sagellm.engine.output import OutputProcessor
from sagellm.engine.runner import ModelRunner, PromptLogprobRows
from sagellm.engine.sampler import Sample, plain_greedy, sample
from sagellm.engine.sampling_params import SamplingParams
from sagellm.engine.scheduler import Scheduler
from sagellm.engine.sequence import Sequence
from sagellm.model.attention import QUERY_BLOCK
from sagellm.model.forward import ModelForward

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int
    max_prefill_tokens: int  # tokens prefilled per step (longer prompts go in chunks)
    max_total_tokens: int  # prompt + generated, per request
    num_kv_blocks: int
    block_size: int = 16
    prefix_caching: bool = True  # reuse cached blocks of earlier prompts (PREFIX_CACHING)


class LLMEngine:
    def __init__(self, model: ModelForward, tokenizer, config: EngineConfig, eos_token_ids: tuple[int, ...],
                 device: str = "cpu", dtype: torch.dtype | None = None, tp_group=None):
        self.tokenizer = tokenizer
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.output = OutputProcessor(tokenizer, self.eos_token_ids, config.max_total_tokens)
        mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        num_kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
        world = tp_group.world if tp_group is not None else 1
        cache_shape = (config.num_kv_blocks, config.block_size, mc.num_hidden_layers, num_kv_heads // world,
                       head_dim, dtype or model.dtype)
        if tp_group is not None:  # every rank holds the same blocks for its own KV heads
            tp_group.send(("cache", cache_shape))
        nb, bs, layers, kvh, hd, dt = cache_shape
        self.cache = PagedKVCache(layers, nb, bs, kvh, hd, dt, device, prefix_caching=config.prefix_caching)
        self.runner = ModelRunner(model, self.cache, device, tp_group)
        self.scheduler = Scheduler(self.cache, config.max_batch_size, config.max_prefill_tokens,
                                   chunk_align=QUERY_BLOCK if model.batch_invariant else 1)
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._by_id: dict[str, Sequence] = {}
        # request id -> logprob of each prompt token (index p scored from tokens 0 .. p - 1), filled
        # chunk by chunk and handed out with the request's first token.
        self._prompt_logprobs: dict[str, list[float | None]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fatal_error: BaseException | None = None
        self.last_progress = time.monotonic()
        self.num_steps = 0
        # Seconds spent per phase of a step, summed (bench/profile_step.py and /metrics read them).
        self.phase_seconds = {"schedule": 0.0, "prepare": 0.0, "forward": 0.0, "sample": 0.0, "output": 0.0}

    # ---- caller side (any thread) ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sagellm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.fatal_error is None

    def num_pending(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting) + len(self.scheduler.running)

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> QueueStream:
        if not self.is_alive():
            raise EngineDead("the engine is not running")
        if params.do_sample and params.seed is None:
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        seq = Sequence(request_id or uuid.uuid4().hex, prompt_ids, params, make_detokenizer(self.tokenizer, prompt_ids))
        stream = QueueStream(seq.request_id, len(prompt_ids), params.seed if params.do_sample else None,
                             seq.events, self.is_alive, lambda: self.abort(seq.request_id))
        self._inbox.append(seq)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)
        self._wake.set()

    # ---- engine thread ----

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self.last_progress = time.monotonic()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self.step()
        except BaseException as exc:  # the loop itself broke: fail everything, report unhealthy
            log.exception("engine loop died")
            self.fatal_error = exc
            for seq in list(self._by_id.values()) + list(self._inbox):
                self._fail(seq, f"engine failure: {exc}")
        finally:
            for seq in list(self._by_id.values()) + list(self._inbox):
                self._fail(seq, "the server is shutting down")

    def _drain_inbox(self) -> None:
        while self._inbox:
            seq = self._inbox.popleft()
            self._by_id[seq.request_id] = seq
            self.scheduler.add(seq)
        while self._aborts:
            seq = self._by_id.get(self._aborts.popleft())
            if seq is not None and not seq.is_finished:
                self._finish(seq, FinishReason.ABORTED)

    def step(self) -> None:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        t1 = time.perf_counter()
        self.phase_seconds["schedule"] += t1 - t0
        if not batch:
            # Nothing fits right now (all blocks taken by prefills in flight); try again shortly.
            self._wake.wait(0.01)
            self._wake.clear()
            return
        sampling = batch.sampling
        phases = self.phase_seconds
        try:
            with torch.inference_mode():
                logits, prompt_rows = self.runner.run(batch, phases)  # in the model's dtype
                t2 = time.perf_counter()
                n = len(sampling)
                if prompt_rows:
                    self._keep_prompt_logprobs(logits[n:].float(), prompt_rows)
                kernels = self.runner.kernels
                samples = (plain_greedy(logits[:n], sampling, self.eos_token_ids, kernels)
                           or sample(logits[:n], sampling, self.eos_token_ids, kernels))
        except Exception as exc:  # one bad step fails its requests, not the server
            log.exception("engine step failed")
            for seq in batch.decodes + [s for s, _ in batch.prefills]:
                self._fail(seq, f"{type(exc).__name__}: {exc}")
            return
        t3 = time.perf_counter()
        phases["sample"] += t3 - t2
        self.scheduler.register_computed(batch.decodes + [s for s, _ in batch.prefills])
        for seq, s in zip(sampling, samples):
            if s.error is not None:  # this row only
                self._fail(seq, s.error)
            else:
                self._append_token(seq, s)
        phases["output"] += time.perf_counter() - t3
        self.num_steps += 1
        self.last_progress = time.monotonic()

    def _keep_prompt_logprobs(self, logits: torch.Tensor, rows: list[PromptLogprobRows]) -> None:
        """logits: [R, vocab] float32, R = sum of rows' counts. Stored by position, so the same
        positions computed again (a preempted prefill) overwrite rather than repeat."""
        targets = torch.tensor([t for r in rows for t in r.seq.prompt_ids[r.start + 1:r.start + 1 + r.count]],
                               device=logits.device)
        logprobs = (logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).tolist()
        offset = 0
        for r in rows:
            store = self._prompt_logprobs.setdefault(r.seq.request_id, [None] * len(r.seq.prompt_ids))
            store[r.start + 1:r.start + 1 + r.count] = logprobs[offset:offset + r.count]
            offset += r.count

    def _take_prompt_logprobs(self, seq: Sequence) -> list[PromptToken] | None:
        if not seq.params.prompt_logprobs:
            return None
        logprobs = self._prompt_logprobs.pop(seq.request_id, None) or [None] * len(seq.prompt_ids)
        return self.output.prompt_tokens(seq, logprobs)

    def _append_token(self, seq: Sequence, s: Sample) -> None:
        seq.output_ids.append(s.token_id)
        if seq.matcher is not None and not seq.matcher.accept(s.token_id):
            self._fail(seq, f"constrained decoding failed: {seq.matcher.error}")
            return
        event = self.output.token_event(seq, s)
        if event.index == 1:
            event.prompt_logprobs = self._take_prompt_logprobs(seq)
        seq.events.put(event)
        if event.finish_reason is not None:
            self._finish(seq, event.finish_reason, emit=False)

    def _finish(self, seq: Sequence, reason: FinishReason, emit: bool = True,
                error: str | None = None) -> None:
        self.scheduler.finish(seq)
        self._by_id.pop(seq.request_id, None)
        self._prompt_logprobs.pop(seq.request_id, None)
        if emit:
            seq.events.put(TokenEvent(len(seq.output_ids), -1, "", 0.0, True, "", [], reason,
                                      None, error))
        seq.events.put(None)

    def _fail(self, seq: Sequence, message: str) -> None:
        if not seq.is_finished:
            self._finish(seq, FinishReason.ERROR, error=message)
