"""The official `openai` SDK against the real server (OpenAI routes: chat, completions, models)."""

from __future__ import annotations

import pytest
import requests

openai = pytest.importorskip("openai")

QUESTION = "Describe the ocean in two sentences."
MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def server(engine_server):
    """This suite runs on both engines (conftest.engine_server): ours, then vLLM."""
    return engine_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def served_name(server):
    data = requests.get(server.url + "/v1/models", timeout=30).json()["data"]
    assert len(data) == 1
    return data[0]["id"]


@pytest.fixture(scope="module")
def greedy(client):
    """The reference greedy answer (32 tokens max) that several tests compare against."""
    return client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=32, temperature=0)


def test_chat_sync(greedy, served_name):
    r = greedy
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == served_name
    assert isinstance(r.created, int) and r.created > 1_600_000_000
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens <= 32
    if choice.finish_reason == "length":
        assert u.completion_tokens == 32


def test_chat_stream_matches_non_stream(client, greedy):
    chunks = list(client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=32,
                                                 temperature=0, stream=True))
    assert chunks, "no chunks"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason is not None]
    assert finishes == [greedy.choices[0].finish_reason]
    # the finish chunk is the last one carrying choices
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason is not None
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == greedy.choices[0].message.content
    assert all(c.usage is None for c in chunks)


def test_chat_stream_include_usage(client, greedy):
    chunks = list(client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    u = last.usage
    assert u is not None
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens == greedy.usage.completion_tokens
    assert u.prompt_tokens == greedy.usage.prompt_tokens
    # only the last chunk carries usage
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert text == greedy.choices[0].message.content


def _mid_word(text: str) -> str:
    """A word (>= 4 letters) from the middle of `text` whose first occurrence is not at the start."""
    words = [w.strip(".,!?;:'\"()") for w in text.split()]
    order = sorted(range(len(words)), key=lambda i: abs(i - len(words) // 2))
    for i in order:
        w = words[i]
        if len(w) >= 4 and w.isalpha() and text.find(w) > len(text) // 5:
            return w
    pytest.fail(f"no usable stop word in greedy answer {text!r}")


@pytest.mark.parametrize("stream", [False, True], ids=["sync", "stream"])
def test_stop_string_cuts_text(client, greedy, stream):
    full = greedy.choices[0].message.content
    word = _mid_word(full)
    expected = full[:full.find(word)]
    kw = dict(model="tgi", messages=MESSAGES, max_tokens=32, temperature=0, stop=[word])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        finish = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        assert finish == ["stop"]
    else:
        r = client.chat.completions.create(**kw)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < greedy.usage.completion_tokens
    assert word not in text
    assert text == expected, f"stop={word!r}"


def test_max_tokens_length(client):
    r = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_max_completion_tokens_alias(client, greedy):
    r = client.chat.completions.create(model="tgi", messages=MESSAGES, max_completion_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    # greedy: the 5 tokens are the start of the 32-token answer
    assert greedy.choices[0].message.content.startswith(r.choices[0].message.content)


def test_n_1_accepted(client):
    r = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=4, temperature=0, n=1)
    assert len(r.choices) == 1
    assert r.choices[0].message.content


def test_models_list(client, served_name):
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert ids == [served_name]
    assert page.data[0].object == "model"


def test_completions_create(client, served_name):
    r = client.completions.create(model="tgi", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert r.model == served_name
    assert len(r.choices) == 1
    assert r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 5


def test_seed_reproducible(client):
    def sample(seed):
        r = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=16,
                                           temperature=0.8, seed=seed)
        return r.choices[0].message.content

    a, b = sample(1234), sample(1234)
    assert a and a == b
