"""/v1/completions as evaluation tools call it, through the `openai` SDK against the real server:
`echo` with `logprobs` lists every prompt token (its logprob against transformers' own forward)
before the generated ones, `max_tokens: 0` scores the prompt alone, whole or streamed; prompts
given as token ids; ids outside the vocabulary are refused."""

from __future__ import annotations

import pytest
import requests
import torch

from helpers import post

openai = pytest.importorskip("openai")

PROMPT = "The capital of France is Paris, and the capital of Germany is"
FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def ids(loaded_model) -> list[int]:
    return loaded_model.tokenizer(PROMPT).input_ids


@pytest.fixture(scope="module")
def reference(reference_model, ids) -> torch.Tensor:
    """transformers' log_softmax at each prompt position: [len(ids), vocab]."""
    with torch.inference_mode():
        return reference_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def lists(logprobs) -> dict:
    return {k: list(getattr(logprobs, k)) for k in FIELDS}


def streamed(client, **kw) -> tuple[str, dict, list]:
    """(text, logprobs lists, finish reasons) of a streamed completion, chunks joined."""
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    text = "".join(c.choices[0].text for c in chunks)
    lp = {k: [v for c in chunks if c.choices[0].logprobs for v in getattr(c.choices[0].logprobs, k)]
          for k in FIELDS}
    return text, lp, [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]


def check_prompt_entries(lp: dict, ids, reference, loaded_model, k: int) -> float:
    """The first len(ids) entries are the prompt's, as transformers scores it; the largest logprob
    difference."""
    p = len(ids)
    assert lp["tokens"][:p] == [loaded_model.tokenizer.decode([i]) for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][:p] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(p)]
    worst = 0.0
    for j in range(1, p):
        worst = max(worst, abs(lp["token_logprobs"][j] - reference[j - 1, ids[j]].item()))
        top = reference[j - 1].topk(k)
        want = {loaded_model.tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        got = lp["top_logprobs"][j]
        assert got.keys() == want.keys(), (j, got, want)
        worst = max(worst, max(abs(got[t] - want[t]) for t in want))
        if ids[j] == top.indices[0].item():  # scorers test "greedy" by comparing these two floats
            assert lp["token_logprobs"][j] == max(got.values())
    assert worst < 1e-3
    return worst


def test_echo_lists_prompt_then_generated_tokens(client, ids, reference, loaded_model):
    kw = dict(model="x", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    echo = client.completions.create(echo=True, **kw)
    plain = client.completions.create(**kw)
    choice, lp = echo.choices[0], lists(echo.choices[0].logprobs)
    assert choice.text == PROMPT + plain.choices[0].text
    assert echo.usage.prompt_tokens == len(ids) and echo.usage.completion_tokens == plain.usage.completion_tokens
    assert len(lp["tokens"]) == len(ids) + echo.usage.completion_tokens
    assert all(len(v) == len(lp["tokens"]) for v in lp.values())
    check_prompt_entries(lp, ids, reference, loaded_model, k=2)
    # The generated tokens as without echo (logprobs to float noise: the prompt's extra logits
    # rows change the step's matmul shapes).
    gen = lists(plain.choices[0].logprobs)
    assert lp["tokens"][len(ids):] == gen["tokens"]
    assert lp["token_logprobs"][len(ids):] == pytest.approx(gen["token_logprobs"], abs=1e-4)
    assert [t.keys() for t in lp["top_logprobs"][len(ids):]] == [t.keys() for t in gen["top_logprobs"]]
    assert [v for t in lp["top_logprobs"][len(ids):] for v in t.values()] == \
        pytest.approx([v for t in gen["top_logprobs"] for v in t.values()], abs=1e-4)
    assert lp["text_offset"][len(ids):] == [len(PROMPT) + o for o in gen["text_offset"]]
    # The generated token's logprob is transformers' at the last prompt position.
    assert abs(lp["token_logprobs"][len(ids)] - reference[-1].max().item()) < 1e-3


def test_max_tokens_0_scores_the_prompt_alone(client, ids, reference, loaded_model):
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = lists(choice.logprobs)
    assert len(lp["tokens"]) == len(ids)
    check_prompt_entries(lp, ids, reference, loaded_model, k=1)
    # echo without logprobs: the prompt's text only
    bare = client.completions.create(model="x", prompt=PROMPT, max_tokens=0, echo=True)
    assert bare.choices[0].text == PROMPT and bare.choices[0].logprobs is None


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_streamed_echo_equals_whole(client, max_tokens):
    kw = dict(model="x", prompt=PROMPT, max_tokens=max_tokens, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kw).choices[0]
    text, lp, finishes = streamed(client, **kw)
    assert text == whole.text and lp == lists(whole.logprobs) and finishes == [whole.finish_reason]


def test_token_id_prompts(client, ids, loaded_model):
    kw = dict(model="x", max_tokens=2, temperature=0, logprobs=1, echo=True)
    as_text = client.completions.create(prompt=PROMPT, **kw).choices[0]
    as_ids = client.completions.create(prompt=ids, **kw).choices[0]
    assert as_ids.text == loaded_model.tokenizer.decode(ids, skip_special_tokens=False) + \
        as_text.text[len(PROMPT):]
    assert lists(as_ids.logprobs)["tokens"] == lists(as_text.logprobs)["tokens"]
    assert lists(as_ids.logprobs)["token_logprobs"][1:] == \
        pytest.approx(lists(as_text.logprobs)["token_logprobs"][1:], abs=1e-4)
    # Several lists of ids: one choice each, in order; without echo, just the generated text.
    other = loaded_model.tokenizer("Grass is").input_ids
    r = client.completions.create(model="x", prompt=[other, ids], max_tokens=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[1].text == as_text.text[len(PROMPT):]
    assert r.usage.prompt_tokens == len(ids) + len(other)


@pytest.mark.parametrize("prompt", [[5, -1], [[5, 6], [5, "vocab"]]], ids=["negative", "past-vocab"])
def test_token_ids_outside_the_vocabulary_are_422(server, loaded_model, prompt):
    vocab = min(len(loaded_model.tokenizer), loaded_model.model.config.vocab_size)
    prompt = [[p if p != "vocab" else vocab for p in q] if isinstance(q, list) else q for q in prompt]
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and str(vocab) in err["message"], err
    assert requests.get(server.url + "/ping", timeout=30).status_code == 200


@pytest.mark.parametrize("body, field", [({"prompt": [1, "a"]}, "prompt"),
                                         ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
                                         ({"prompt": "Hi", "max_tokens": -1, "echo": True}, "max_tokens")])
def test_bad_scoring_requests_are_422(server, body, field):
    r = post(server, "/v1/completions", body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"].startswith(field), r.text
