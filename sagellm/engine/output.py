"""What the engine thread makes of each sampled token: its text (incremental detokenizing, stop
strings withheld), whether the sequence ends (sagellm.engine.stopping), and the TokenEvent the
request's stream receives."""

from __future__ import annotations

from sagellm.engine.events import FinishReason, PromptToken, TokenEvent, TopToken
from sagellm.engine.sampler import Sample
from sagellm.engine.sequence import Sequence
from sagellm.engine.stopping import finish_reason


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_total_tokens: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_total_tokens = max_total_tokens
        self.special_ids = frozenset(tokenizer.all_special_ids)
        # token id -> its text alone, decoded once: top-logprob alternatives repeat across steps
        # (at most a vocabulary's worth of short strings).
        self._texts: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def token_event(self, seq: Sequence, sample: Sample) -> TokenEvent:
        """The event for `sample`, the token just appended to `seq.output_ids`."""
        token_id = sample.token_id
        text = seq.detokenizer.step(token_id)
        special = token_id in self.special_ids
        # Special tokens are not content: never matched against stop strings, never in `delta`.
        delta, stop_string = ("", None) if special else seq.stop_matcher.feed(text)
        finish, stop_reason = finish_reason(seq, token_id, stop_string, self.eos_token_ids, self.max_total_tokens)
        if finish is not None and finish != FinishReason.STOP_SEQUENCE:
            delta += seq.stop_matcher.flush()  # text withheld in case it began a stop string
        top = [TopToken(t, self.token_text(t), lp, t in self.special_ids) for t, lp in sample.top]
        return TokenEvent(len(seq.output_ids), token_id, text, sample.logprob, special, delta, top, finish,
                          stop_reason)

    def prompt_tokens(self, seq: Sequence, logprobs: list[float | None]) -> list[PromptToken]:
        """Every prompt token with its text and logprob (TGI's prefill details)."""
        texts = self.tokenizer.batch_decode([[t] for t in seq.prompt_ids], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
        return [PromptToken(t, text, lp) for t, text, lp in zip(seq.prompt_ids, texts, logprobs)]
