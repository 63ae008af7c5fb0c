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

from sagellm.engine.adapters import AdapterRegistry
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
from sagellm.errors import NotFound, ValidationError
from sagellm.model.attention_ops import QUERY_BLOCK
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
    lone_prefill_tokens: int = 0  # a step's prefill budget when its only sequence is a prompt (0: as above)


@dataclass
class _PromptScores:
    logprobs: list[float | None]  # [prompt length]
    tops: list[list[tuple[int, float]]]  # [prompt length][prompt_top_n]


class LLMEngine:
    def __init__(self, model: ModelForward, tokenizer, config: EngineConfig, eos_token_ids: tuple[int, ...],
                 device: str = "cpu", dtype: torch.dtype | None = None, tp_group=None,
                 adapters: AdapterRegistry | None = None):
        self.tokenizer = tokenizer
        self.adapters = adapters  # None: LoRA serving is off
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.output = OutputProcessor(tokenizer, self.eos_token_ids, config.max_total_tokens)
        mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        num_kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
        self.vocab_size = mc.vocab_size  # rows of the logits; logit_bias ids must be below it
        world = tp_group.world if tp_group is not None else 1
        cache_shape = (config.num_kv_blocks, config.block_size, mc.num_hidden_layers, num_kv_heads // world,
                       head_dim, dtype or model.dtype)
        if tp_group is not None:  # every rank holds the same blocks for its own KV heads
            tp_group.send(("cache", cache_shape))
        nb, bs, layers, kvh, hd, dt = cache_shape
        self.cache = PagedKVCache(layers, nb, bs, kvh, hd, dt, device, prefix_caching=config.prefix_caching)
        self.runner = ModelRunner(model, self.cache, device, tp_group, adapters)
        if adapters is not None:  # the configured adapters' stack, before the first request needs it
            model.prepare_lora(adapters.resident_weights())
        self.scheduler = Scheduler(self.cache, config.max_batch_size, config.max_prefill_tokens,
                                   chunk_align=QUERY_BLOCK if model.batch_invariant else 1,
                                   lone_prefill_tokens=config.lone_prefill_tokens)
        self._inbox: deque[Sequence] = deque()
        self._aborts: deque[str] = deque()
        self._by_id: dict[str, Sequence] = {}
        # request id -> logprob of each prompt token (index p scored from tokens 0 .. p - 1) and
        # the (token id, logprob) alternatives at each place, filled chunk by chunk and handed out
        # with the request's first token.
        self._prompt_logprobs: dict[str, _PromptScores] = {}
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
        return (self._thread is not None and self._thread.is_alive() and self.fatal_error is None
                and not self._stop.is_set())

    def num_pending(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting) + len(self.scheduler.running)

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> QueueStream:
        if not self.is_alive():
            raise EngineDead("the engine is not running")
        if params.do_sample and params.seed is None:
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        if any(not 0 <= t < self.vocab_size for t, _ in params.logit_bias):
            raise ValidationError(f"`logit_bias` keys must be token ids >= 0 and < {self.vocab_size} "
                                  "(the vocabulary size)", param="logit_bias")
        lora = None
        if params.adapter is not None:
            if self.adapters is None:
                raise NotFound(f"adapter `{params.adapter}` is not loaded (LoRA serving is off)", param="adapter_id")
            lora = self.adapters.acquire(params.adapter)  # released when the sequence finishes
        seq = Sequence(request_id or uuid.uuid4().hex, prompt_ids, params, make_detokenizer(self.tokenizer, prompt_ids),
                       lora)
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
                    if self.cache.warm_ahead():  # one slice, then look at the inbox again
                        continue
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
                samples, failed = self._sample(logits[:n], sampling)
        except Exception as exc:  # the forward pass failed: every request in it fails, not the server
            log.exception("engine step failed")
            for seq in batch.decodes + [s for s, _ in batch.prefills]:
                self._fail(seq, f"{type(exc).__name__}: {exc}")
            return
        t3 = time.perf_counter()
        phases["sample"] += t3 - t2
        self.scheduler.register_computed(batch.decodes + [s for s, _ in batch.prefills])
        for seq, message in failed:
            self._fail(seq, message)
        for seq, s in zip(sampling, samples):
            if s is None:
                continue
            if s.error is not None:  # this row only
                self._fail(seq, s.error)
                continue
            try:  # the grammar's matcher, the detokenizer or a stop rule raising ends this request only
                if seq.params.max_new_tokens == 0:  # scored the prompt; its sample is not wanted
                    self._finish_scored(seq)
                else:
                    self._append_token(seq, s)
            except Exception as exc:
                log.exception("request %s failed after sampling", seq.request_id)
                self._fail(seq, f"{type(exc).__name__}: {exc}")
        phases["output"] += time.perf_counter() - t3
        self.num_steps += 1
        self.last_progress = time.monotonic()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]
                ) -> tuple[list[Sample | None], list[tuple[Sequence, str]]]:
        """logits: [N, vocab] in the model's dtype, one row per sequence. One Sample per row (its
        `error` set when no token could be drawn), None for a row failed here; those rows are
        returned with the error to fail them alone (logit_bias ids were checked at submit: the fused
        kernel indexes with them). When the batch
        raises, each row is sampled again on its own from the same logits (the draws are keyed by
        seed and position, not by the batch), so the others get the tokens they would have drawn."""
        kernels, eos = self.runner.kernels, self.eos_token_ids
        try:
            # No copy: sample() leaves the logits as they were, so the fallback below reads them too.
            return (plain_greedy(logits, seqs, eos, kernels) or sample(logits, seqs, eos, kernels)), []
        except Exception:
            log.exception("sampling a batch of %d failed; sampling its rows one by one", len(seqs))
        failed: list[tuple[Sequence, str]] = []
        samples: list[Sample | None] = []
        for i, seq in enumerate(seqs):
            try:
                samples.append(sample(logits[i:i + 1], [seq], eos, kernels)[0])
            except Exception as exc:
                samples.append(None)
                failed.append((seq, f"sampling failed: {type(exc).__name__}: {exc}"))
        return samples, failed

    def _keep_prompt_logprobs(self, logits: torch.Tensor, rows: list[PromptLogprobRows]) -> None:
        """logits: [R, vocab] float32, R = sum of rows' counts. Stored by position, so the same
        positions computed again (a preempted prefill) overwrite rather than repeat."""
        targets = torch.tensor([t for r in rows for t in r.seq.prompt_ids[r.start + 1:r.start + 1 + r.count]],
                               device=logits.device)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [R, 1]
        # The same subtraction for the token and its alternatives: when the token is the most
        # likely one, both logprobs are the same float (scorers compare them for "greedy").
        logprobs = (logits.gather(1, targets[:, None]) - lse)[:, 0].tolist()
        k = max(r.seq.params.prompt_top_n for r in rows)
        if k:
            top_values, top_ids = logits.topk(k, dim=-1)  # [R, k]
            top_values, top_ids = (top_values - lse).tolist(), top_ids.tolist()
        offset = 0
        for r in rows:
            n = len(r.seq.prompt_ids)
            store = self._prompt_logprobs.setdefault(r.seq.request_id, _PromptScores([None] * n, [[]] * n))
            place = slice(r.start + 1, r.start + 1 + r.count)
            store.logprobs[place] = logprobs[offset:offset + r.count]
            if want := r.seq.params.prompt_top_n:
                store.tops[place] = [list(zip(top_ids[j][:want], top_values[j][:want]))
                                     for j in range(offset, offset + r.count)]
            offset += r.count

    def _take_prompt_logprobs(self, seq: Sequence) -> list[PromptToken] | None:
        if not seq.params.prompt_logprobs:
            return None
        n = len(seq.prompt_ids)
        scores = self._prompt_logprobs.pop(seq.request_id, None) or _PromptScores([None] * n, [[]] * n)
        return self.output.prompt_tokens(seq, scores.logprobs, scores.tops)

    def _finish_scored(self, seq: Sequence) -> None:
        """A request with max_new_tokens 0 ends once its prompt is prefilled: one event, no token,
        with the prompt's logprobs."""
        event = TokenEvent(0, -1, "", None, True, "", [], FinishReason.LENGTH,
                           prompt_logprobs=self._take_prompt_logprobs(seq))
        seq.events.put(event)
        self._finish(seq, FinishReason.LENGTH, emit=False)

    def _append_token(self, seq: Sequence, s: Sample) -> None:
        seq.output_ids.append(s.token_id)
        if seq.matcher is not None and not seq.matcher.accept(s.token_id):
            self._fail(seq, f"constrained decoding failed: {seq.matcher.error}")
            return
        event = self.output.token_event(seq, s)
        if event.index == 1:
            event.prompt_logprobs = self._take_prompt_logprobs(seq)
            event.queue_s = seq.queue_s
        if event.finish_reason is not None:  # before the client can see the end (and ask for another)
            self._release_adapter(seq)
        seq.events.put(event)
        if event.finish_reason is not None:
            self._finish(seq, event.finish_reason, emit=False)

    def _finish(self, seq: Sequence, reason: FinishReason, emit: bool = True,
                error: str | None = None) -> None:
        self._release_adapter(seq)
        self.scheduler.finish(seq)
        self._by_id.pop(seq.request_id, None)
        self._prompt_logprobs.pop(seq.request_id, None)
        if emit:
            seq.events.put(TokenEvent(len(seq.output_ids), -1, "", 0.0, True, "", [], reason,
                                      None, error))
        seq.events.put(None)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_held:
            seq.lora_held = False
            self.adapters.release(seq.lora)

    def _fail(self, seq: Sequence, message: str) -> None:
        if not seq.is_finished:
            self._finish(seq, FinishReason.ERROR, error=message)
