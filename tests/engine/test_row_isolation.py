"""A request whose row raises inside a step (sampler, grammar matcher, detokenizer) ends alone with
an error; the requests sharing the step get the tokens they get when run by themselves."""

from __future__ import annotations

import pytest

from sagellm.engine.engine import EngineConfig, LLMEngine
from sagellm.engine.events import FinishReason
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import ValidationError

PROMPT = "The quick brown fox"
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=24, ignore_eos=True, do_sample=True, temperature=0.9, top_p=0.95, seed=7)


class _RaisingMatcher:
    """A grammar matcher that allows every token, then fails on accepting one (a matcher bug)."""

    error = None
    finished = False

    def fill(self, bitmask, row):
        bitmask[row].fill_(-1)

    def accept(self, token_id):
        raise RuntimeError("matcher exploded")


class _RaisingGrammar:
    def matcher(self):
        return _RaisingMatcher()


class _RaisingDetokenizer:
    def step(self, token_id):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "detokenizer exploded")


@pytest.fixture(scope="module")
def engine(loaded_model):
    e = LLMEngine(loaded_model.model, loaded_model.tokenizer,
                  EngineConfig(max_batch_size=16, max_prefill_tokens=256, max_total_tokens=512, num_kv_blocks=256),
                  loaded_model.eos_token_ids)
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def prompt(loaded_model):
    return loaded_model.tokenizer(PROMPT).input_ids


def _tokens(events) -> list[int]:
    assert events[-1].finish_reason == FinishReason.LENGTH and events[-1].error is None, events[-1]
    return [e.token_id for e in events]


def _bad(engine, prompt, kind: str):
    if kind == "nan_temperature":
        return engine.submit(prompt, SamplingParams(max_new_tokens=8, do_sample=True, temperature=float("nan"),
                                                    seed=1))
    if kind == "tiny_repetition_penalty":
        return engine.submit(prompt, SamplingParams(max_new_tokens=8, do_sample=True, repetition_penalty=1e-45,
                                                    seed=1))
    if kind == "grammar":
        return engine.submit(prompt, SamplingParams(max_new_tokens=8, grammar=_RaisingGrammar()))
    stream = engine.submit(prompt, SamplingParams(max_new_tokens=8))
    return stream


def test_logit_bias_outside_the_vocabulary_is_refused_at_submit(engine, prompt):
    # The fused sampler indexes with the ids: such a request never joins a batch.
    with pytest.raises(ValidationError, match="logit_bias") as err:
        engine.submit(prompt, SamplingParams(max_new_tokens=8, logit_bias=((10**6, 5.0),)))
    assert err.value.param == "logit_bias"
    assert engine.num_pending() == 0


@pytest.mark.parametrize("kind", ["nan_temperature", "tiny_repetition_penalty", "grammar",
                                  "detokenizer"])
def test_a_failing_row_ends_alone(engine, prompt, kind, monkeypatch):
    alone = [_tokens(list(engine.submit(prompt, p))) for p in (GREEDY, SAMPLED)]
    good = [engine.submit(prompt, p) for p in (GREEDY, SAMPLED)]
    if kind == "detokenizer":  # the next request's detokenizer raises on its first token
        monkeypatch.setattr("sagellm.engine.engine.make_detokenizer", lambda tok, ids: _RaisingDetokenizer())
    bad = _bad(engine, prompt, kind)
    monkeypatch.undo()
    bad_events = list(bad)
    assert bad_events[-1].finish_reason == FinishReason.ERROR and bad_events[-1].error, bad_events[-1]
    assert [_tokens(list(s)) for s in good] == alone
    # The engine keeps serving afterwards.
    assert _tokens(list(engine.submit(prompt, GREEDY))) == alone[0]
