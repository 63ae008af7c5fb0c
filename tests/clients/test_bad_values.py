"""One request's bad values never fail another (issue 11, part 1): while a greedy and a seeded
sampled stream run on the real server, each bad body gets a 422 naming its field, and both
streams finish whole, with the tokens they get alone."""

from __future__ import annotations

import json
import threading

import requests

from helpers import (TIMEOUT, _native_done, _openai_done, data_of, error_message, openai_stream_json, ping_ok,
                     read_stream, split_events)

CHAT = [{"role": "user", "content": "Tell me a long story about a dragon."}]
SELF_REF = {"type": "object", "properties": {"n": {"$ref": "#"}}, "required": ["n"]}
NAN, INF = float("nan"), float("inf")

GREEDY = ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                                   "stream": True})
SAMPLED = ("/generate_stream", {"inputs": "Once upon a time", "parameters": {
    "max_new_tokens": 12, "do_sample": True, "temperature": 0.8, "top_p": 0.95, "seed": 11, "ignore_eos": True,
    "details": True}})


def _native(**params) -> tuple[str, str, dict]:
    return "/generate", "tgi", {"inputs": "Hello", "parameters": {"max_new_tokens": 4, **params}}


def _chat(**fields) -> tuple[str, str, dict]:
    return "/v1/chat/completions", "openai", {"messages": CHAT, "max_tokens": 4, **fields}


BAD = [  # (route, flavor, body, the field the answer names)
    (*_native(temperature=NAN), "temperature"),
    (*_native(temperature=INF), "temperature"),
    (*_native(top_p=NAN), "top_p"),
    (*_native(typical_p=NAN), "typical_p"),
    (*_native(top_k=NAN), "top_k"),
    (*_native(repetition_penalty=1e-45), "repetition_penalty"),
    (*_native(repetition_penalty=NAN), "repetition_penalty"),
    (*_native(repetition_penalty=INF), "repetition_penalty"),
    (*_native(frequency_penalty=NAN), "frequency_penalty"),
    (*_native(presence_penalty=INF), "presence_penalty"),
    (*_native(grammar={"type": "json", "value": SELF_REF}), "grammar"),
    (*_chat(logit_bias={"60000": 5}), "logit_bias"),
    (*_chat(logit_bias={"-1": 1}), "logit_bias"),
    (*_chat(logit_bias={"²": 1}), "logit_bias"),
    (*_chat(temperature=NAN), "temperature"),
    (*_chat(top_p=INF), "top_p"),
    (*_chat(repetition_penalty=1e-45), "repetition_penalty"),
    (*_chat(presence_penalty=NAN), "presence_penalty"),
    (*_chat(frequency_penalty=-INF), "frequency_penalty"),
    (*_chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SELF_REF}}),
     "response_format"),
    (*_chat(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    ("/v1/completions", "openai", {"prompt": "Hello", "max_tokens": 4, "logit_bias": {"99999999": 1}},
     "logit_bias"),
    ("/v1/completions", "openai", {"prompt": "Hello", "max_tokens": 4, "temperature": INF}, "temperature"),
    ("/invocations", "tgi", {"inputs": "Hello", "parameters": {"temperature": NAN}}, "temperature"),
]


def _post_raw(url: str, path: str, body: dict, **kw) -> requests.Response:
    # json.dumps writes NaN and Infinity as JavaScript does; Python's json (the server's) reads them.
    return requests.post(url + path, data=json.dumps(body), headers={"Content-Type": "application/json"},
                         timeout=TIMEOUT, **kw)


def _greedy_text(raw: bytes) -> str:
    chunks = openai_stream_json(raw)
    assert chunks[-1] == "[DONE]", chunks[-3:]
    assert not any(isinstance(c, dict) and "error" in c for c in chunks), chunks
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks[:-1] if ch["choices"])
    finishes = [ch["choices"][0].get("finish_reason") for ch in chunks[:-1] if ch["choices"]]
    assert finishes[-1] == "length", finishes[-3:]
    return text


def _sampled_text(raw: bytes) -> str:
    last = json.loads(data_of(split_events(raw)[-1]))
    assert "error" not in last, last
    assert last["details"]["generated_tokens"] == 12, last["details"]
    return last["generated_text"]


def _stream(url: str, route, native: bool, started: threading.Event, out: list) -> None:
    """Read a stream to its terminal event, saying when its first bytes arrived."""
    r = _post_raw(url, *route, stream=True)
    buf = b""
    try:
        for piece in r.iter_content(chunk_size=None):
            buf += piece
            started.set()
            if (_native_done if native else _openai_done)(buf):
                break
    finally:
        r.close()
        started.set()
        out.append(buf)


def _run_alone(url: str) -> tuple[str, str]:
    greedy = read_stream(_post_raw(url, *GREEDY, stream=True))
    sampled = read_stream(_post_raw(url, *SAMPLED, stream=True), native=True)
    return _greedy_text(greedy), _sampled_text(sampled)


def test_bad_values_are_422_while_streams_run_untouched(server):
    alone = _run_alone(server.url)
    outs: list[list] = [[], []]
    started = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=_stream, args=(server.url, route, native, started[i], outs[i]))
               for i, (route, native) in enumerate(((GREEDY, False), (SAMPLED, True)))]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(TIMEOUT)
    answers = [(path, field, _post_raw(server.url, path, body)) for path, flavor, body, field in BAD]
    for t in threads:
        t.join(TIMEOUT)
    for (path, flavor, _, field), (_, _, r) in zip(BAD, answers):
        msg = error_message(r, 422, flavor)
        assert field in msg, (path, field, msg)
        if flavor == "openai":
            assert r.json()["error"]["param"] == field, (path, r.text)
    assert (_greedy_text(outs[0][0]), _sampled_text(outs[1][0])) == alone
    ping_ok(server.url)
