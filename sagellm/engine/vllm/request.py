"""One request's vLLM outputs as our TokenEvents: the detokenizer, stop-string matcher and finish
rules of sagellm's own engine (sagellm.engine.output, .stopping), fed with the tokens and logprobs vLLM
samples, so every caller reads the same event stream from either engine."""

from __future__ import annotations

import queue
import time

from sagellm.engine.detokenizer import StopMatcher, make_detokenizer
from sagellm.engine.events import FinishReason, PromptToken, TokenEvent, TopToken
from sagellm.engine.sampling_params import SamplingParams

# vLLM's CompletionOutput.finish_reason. Stop strings and stop ids are ours to find, so a vLLM
# "stop" is always an EOS (the tokenizer's or generation_config's) or a grammar's forced end.
_FINISH = {"stop": FinishReason.EOS_TOKEN, "length": FinishReason.LENGTH,
           "abort": FinishReason.ABORTED, "error": FinishReason.ERROR}


class VllmRequest:
    """What its QueueStream reads (request_id, prompt_ids, params, events) and the state that turns
    vLLM's deltas into events. Fed on the engine's event-loop thread only."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer,
                 special_ids: frozenset[int]):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.events: queue.SimpleQueue[TokenEvent | None] = queue.SimpleQueue()
        self.finished = False
        self.num_output = 0
        self.task = None  # the asyncio task pumping vLLM's outputs into `feed`
        self.lora = None  # the adapter's LoraWeights (checked, weightless) while it is held
        self._tokenizer = tokenizer
        self._special_ids = special_ids
        self._detokenizer = make_detokenizer(tokenizer, prompt_ids)
        self._stop_matcher = StopMatcher(params.stop)

    def feed(self, out) -> bool:
        """Events for one vLLM RequestOutput (DELTA kind: the tokens new since the last one, more
        than one when the loop fell behind); True once the request has ended."""
        c = out.outputs[0]
        last = len(c.token_ids) - 1
        for i, token_id in enumerate(c.token_ids):
            vllm_finish = c.finish_reason if out.finished and i == last else None
            logprobs = c.logprobs[i] if c.logprobs is not None else None
            prompt = out.prompt_logprobs if self.num_output == 0 else None
            self._token(token_id, logprobs, vllm_finish, prompt)
            if self.finished:
                return True
        if out.finished:  # ended with no token of its own (aborted or failed inside vLLM)
            self.end(_FINISH.get(c.finish_reason, FinishReason.ERROR),
                     None if c.finish_reason == "abort" else f"vLLM ended the request ({c.finish_reason})")
        return self.finished

    def _token(self, token_id: int, logprobs, vllm_finish: str | None, prompt_logprobs) -> None:
        p = self.params
        self.num_output += 1
        text = self._detokenizer.step(token_id)
        special = token_id in self._special_ids
        delta, stop_str = ("", None) if special else self._stop_matcher.feed(text)
        finish, stop_reason, error = None, None, None
        if vllm_finish == "stop":
            finish = FinishReason.EOS_TOKEN
        elif stop_str is not None:
            finish, stop_reason = FinishReason.STOP_SEQUENCE, stop_str
        elif token_id in p.stop_token_ids:
            finish, stop_reason = FinishReason.STOP_SEQUENCE, token_id
        elif vllm_finish == "length" or (p.deadline is not None and time.monotonic() >= p.deadline):
            finish = FinishReason.LENGTH
        elif vllm_finish is not None:
            finish = _FINISH.get(vllm_finish, FinishReason.ERROR)
            error = f"vLLM ended the request ({vllm_finish})"
        if finish is not None and finish != FinishReason.STOP_SEQUENCE:
            delta += self._stop_matcher.flush()
        logprob = logprobs[token_id].logprob if logprobs is not None and token_id in logprobs else None
        prompt = self._prompt_tokens(prompt_logprobs) if p.prompt_logprobs and self.num_output == 1 else None
        self.events.put(TokenEvent(self.num_output, token_id, text, logprob, special, delta,
                                   self._top(logprobs), finish, stop_reason, error, prompt_logprobs=prompt))
        if finish is not None:
            self.finished = True
            self.events.put(None)

    def _top(self, logprobs) -> list[TopToken]:
        """The `top_n_tokens` best, best first. vLLM's dict for a position holds the chosen token
        first, then the k best in order; when the chosen one is among them it appears once, with
        its place among the best as its rank."""
        k = self.params.top_n_tokens
        if not k or logprobs is None:
            return []
        entries = list(logprobs.items())
        best = entries[1:] if len(entries) > k else sorted(entries, key=lambda e: e[1].rank)
        decode = self._tokenizer.decode
        return [TopToken(t, decode([t], skip_special_tokens=False), lp.logprob, t in self._special_ids)
                for t, lp in best[:k]]

    def _prompt_tokens(self, prompt_logprobs) -> list[PromptToken]:
        """Every prompt token with the logprob vLLM gave it (None for the first, no context)."""
        ids = self.prompt_ids
        texts = self._tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False)
        rows = list(prompt_logprobs) if prompt_logprobs is not None else []
        logprobs = [None] * len(ids)
        for i, row in enumerate(rows[1:len(ids)], start=1):
            if row is not None and ids[i] in row:
                logprobs[i] = row[ids[i]].logprob
        return [PromptToken(t, text, lp) for t, text, lp in zip(ids, texts, logprobs)]

    def end(self, reason: FinishReason, error: str | None = None) -> None:
        """End without a token of its own (aborted, failed, shut down), as sagellm's engine does."""
        if self.finished:
            return
        self.finished = True
        self.events.put(TokenEvent(self.num_output, -1, "", 0.0, True, "", [], reason, None, error))
        self.events.put(None)
