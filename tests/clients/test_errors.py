"""Bad input against the real server: a 4xx JSON body naming the field and the limit, in the TGI
shape on the native routes and the OpenAI shape on /v1, never a traceback, and /ping still 200."""

from __future__ import annotations

import json

import pytest
import requests

from helpers import any_shape_message, error_message, oai_error, ping_ok, post_url, tgi_error

TIMEOUT = 60
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def server(engine_server):
    """This suite runs on both engines (conftest.engine_server): ours, then vLLM."""
    return engine_server


@pytest.fixture(scope="module")
def info(server):
    r = requests.get(server.url + "/info", timeout=10)
    assert r.status_code == 200
    return r.json()


# Every generation route with a small valid body of its own shape.
ROUTES = [
    ("/generate", "tgi", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
    ("/generate_stream", "tgi", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
    ("/", "tgi", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
    ("/invocations", "tgi", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}),
    ("/v1/chat/completions", "openai", {"messages": CHAT, "max_tokens": 2}),
    ("/v1/completions", "openai", {"prompt": "Hello", "max_tokens": 2}),
]
ROUTE_IDS = [r[0] for r in ROUTES]


# ---- malformed bodies ----

@pytest.mark.parametrize("path,flavor,_", ROUTES, ids=ROUTE_IDS)
def test_malformed_json_is_400(server, path, flavor, _):
    r = requests.post(server.url + path, data=b'{"inputs": "Hello", ', timeout=TIMEOUT,
                      headers={"Content-Type": "application/json"})
    msg = error_message(r, 400, flavor)
    assert "JSON" in msg, msg
    ping_ok(server.url)


@pytest.mark.parametrize("raw", [b'["Hello", "world"]', b'"Hello"'], ids=["array", "string"])
@pytest.mark.parametrize("path,flavor,_", ROUTES, ids=ROUTE_IDS)
def test_body_not_an_object_is_400(server, path, flavor, _, raw):
    r = requests.post(server.url + path, data=raw, timeout=TIMEOUT,
                      headers={"Content-Type": "application/json"})
    msg = error_message(r, 400, flavor)
    assert "object" in msg.lower(), msg
    ping_ok(server.url)


# ---- schema errors ----

def test_missing_inputs_is_422(server):
    r = post_url(server.url, "/generate", {"parameters": {"max_new_tokens": 2}})
    msg = tgi_error(r, 422)
    assert "inputs" in msg, msg
    ping_ok(server.url)


def test_missing_messages_is_422(server):
    r = post_url(server.url, "/v1/chat/completions", {"max_tokens": 2})
    err = oai_error(r, 422)
    assert "messages" in err["message"], err
    assert err["param"] == "messages", err
    ping_ok(server.url)


def test_wrong_typed_max_new_tokens_is_422(server):
    r = post_url(server.url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": "abc"}})
    msg = tgi_error(r, 422)
    assert "max_new_tokens" in msg, msg
    ping_ok(server.url)


def test_wrong_typed_messages_is_422(server):
    r = post_url(server.url, "/v1/chat/completions", {"messages": "hi", "max_tokens": 2})
    err = oai_error(r, 422)
    assert "messages" in err["message"], err
    assert err["param"] == "messages", err
    ping_ok(server.url)


def test_numeric_string_is_coerced_native(server):
    r = post_url(server.url, "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "5", "details": True}})
    assert r.status_code == 200, r.text
    assert r.json()["details"]["generated_tokens"] == 5, r.text
    ping_ok(server.url)


def test_numeric_string_is_coerced_openai(server):
    r = post_url(server.url, "/v1/chat/completions",
             {"messages": CHAT, "max_tokens": "5", "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5, r.text


# ---- out-of-range numbers ----

OUT_OF_RANGE = [
    # (route, flavor, body, field, words the message must contain)
    ("/generate", "tgi", {"inputs": "Hello", "parameters": {"top_p": 1.5}}, "top_p", ["1.0"]),
    ("/v1/chat/completions", "openai", {"messages": CHAT, "top_p": 1.5}, "top_p", ["1.0"]),
    ("/generate", "tgi", {"inputs": "Hello", "parameters": {"temperature": -1}}, "temperature", ["0"]),
    ("/v1/chat/completions", "openai", {"messages": CHAT, "temperature": -1}, "temperature", ["0"]),
    ("/generate", "tgi", {"inputs": "Hello", "parameters": {"min_p": 1.5}}, "min_p", ["1.0"]),
    ("/v1/chat/completions", "openai", {"messages": CHAT, "min_p": -0.1}, "min_p", ["0.0"]),
    ("/generate", "tgi", {"inputs": "Hello", "parameters": {"frequency_penalty": 3}}, "frequency_penalty",
     ["2.0"]),
    ("/v1/chat/completions", "openai", {"messages": CHAT, "frequency_penalty": 3}, "frequency_penalty",
     ["2.0"]),
    ("/v1/chat/completions", "openai", {"messages": CHAT, "max_tokens": 0}, "max_tokens", ["positive"]),
    ("/v1/completions", "openai", {"prompt": "Hello", "max_tokens": 0}, "max_tokens", ["positive"]),
    ("/generate", "tgi", {"inputs": "Hello", "parameters": {"max_new_tokens": 0}}, "max_new_tokens",
     ["positive"]),
    ("/generate", "tgi", {"inputs": "Hello", "parameters": {"top_n_tokens": 1000}}, "top_n_tokens",
     ["{max_top_n_tokens}"]),
    ("/v1/chat/completions", "openai", {"messages": CHAT, "logprobs": True, "top_logprobs": 1000},
     "top_logprobs", ["{max_top_n_tokens}"]),
    ("/v1/chat/completions", "openai", {"messages": CHAT, "top_logprobs": 3}, "top_logprobs", ["logprobs"]),
]


@pytest.mark.parametrize("path,flavor,body,field,words", OUT_OF_RANGE,
                         ids=[f"{c[0]}-{c[3]}-{json.dumps(c[2].get('parameters', c[2]).get(c[3]))}"
                              for c in OUT_OF_RANGE])
def test_out_of_range_is_422(server, info, path, flavor, body, field, words):
    r = post_url(server.url, path, body)
    msg = error_message(r, 422, flavor)
    assert field in msg, msg
    for w in words:
        w = w.format(**info)
        assert w in msg, f"{w!r} (the limit) missing from {msg!r}"
    if flavor == "openai":
        assert r.json()["error"]["param"] == field, r.text
    ping_ok(server.url)


@pytest.mark.parametrize("path,flavor,body,field", [
    ("/v1/chat/completions", "openai", {"messages": CHAT, "temperature": float("nan")}, "temperature"),
    ("/generate", "tgi", {"inputs": "Hello", "parameters": {"repetition_penalty": float("nan")}}, "repetition_penalty"),
])
def test_nan_is_422(server, path, flavor, body, field):
    """Python's JSON parser takes NaN; a NaN temperature would leave a row nothing to sample."""
    r = requests.post(server.url + path, data=json.dumps(body), timeout=TIMEOUT,
                      headers={"Content-Type": "application/json"})
    assert field in error_message(r, 422, flavor)
    ping_ok(server.url)


# ---- stop sequences ----

@pytest.mark.parametrize("path,flavor", [("/generate", "tgi"), ("/v1/chat/completions", "openai"),
                                         ("/v1/completions", "openai")])
def test_too_many_stop_sequences_is_422(server, info, path, flavor):
    assert info["max_stop_sequences"] == 16  # the documented default
    stops = [f"stop{i}" for i in range(17)]
    if flavor == "tgi":
        body = {"inputs": "Hello", "parameters": {"stop": stops, "max_new_tokens": 2}}
    elif path == "/v1/completions":
        body = {"prompt": "Hello", "stop": stops, "max_tokens": 2}
    else:
        body = {"messages": CHAT, "stop": stops, "max_tokens": 2}
    msg = error_message(post_url(server.url, path, body), 422, flavor)
    assert "stop" in msg and "16" in msg, msg
    ping_ok(server.url)


def test_sixteen_stop_sequences_are_accepted(server):
    stops = [f"zzstop{i}" for i in range(16)]
    r = post_url(server.url, "/generate", {"inputs": "Hello", "parameters": {"stop": stops, "max_new_tokens": 2}})
    assert r.status_code == 200, r.text


# ---- context limits ----

def test_prompt_longer_than_max_input_tokens_native(server, info):
    limit = info["max_input_tokens"]
    r = post_url(server.url, "/generate", {"inputs": "hello " * (limit + 800), "parameters": {"max_new_tokens": 2}})
    msg = tgi_error(r, 422)
    assert "inputs" in msg, msg
    assert str(limit) in msg or str(limit + 1) in msg, f"limit {limit} not named: {msg!r}"
    ping_ok(server.url)


def test_prompt_longer_than_max_input_tokens_chat(server, info):
    limit = info["max_input_tokens"]
    body = {"messages": [{"role": "user", "content": "hello " * (limit + 800)}], "max_tokens": 2}
    err = oai_error(post_url(server.url, "/v1/chat/completions", body), 422)
    assert "messages" in err["message"], err
    assert str(limit) in err["message"] or str(limit + 1) in err["message"], err
    ping_ok(server.url)


def test_prompt_plus_max_new_tokens_over_total_native(server, info):
    total = info["max_total_tokens"]
    requested = total - 10
    r = post_url(server.url, "/generate",
             {"inputs": "hello " * 100, "parameters": {"max_new_tokens": requested}})
    msg = tgi_error(r, 422)
    assert "max_new_tokens" in msg, msg
    assert str(total) in msg and str(requested) in msg, msg
    ping_ok(server.url)


def test_prompt_plus_max_tokens_over_total_chat(server, info):
    total = info["max_total_tokens"]
    requested = total - 10
    body = {"messages": [{"role": "user", "content": "hello " * 100}], "max_tokens": requested}
    err = oai_error(post_url(server.url, "/v1/chat/completions", body), 422)
    assert "max_tokens" in err["message"], err
    assert str(total) in err["message"] and str(requested) in err["message"], err
    ping_ok(server.url)


# ---- content types ----

def test_json_content_type_with_charset_is_accepted(server):
    r = requests.post(server.url + "/generate", timeout=TIMEOUT,
                      data=json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).encode(),
                      headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    assert "generated_text" in r.json()


def test_missing_content_type_is_accepted(server):
    req = requests.Request("POST", server.url + "/generate",
                           data=json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).encode(),
                           headers={})
    prepared = req.prepare()
    assert "Content-Type" not in prepared.headers  # really no content type on the wire
    with requests.Session() as s:
        r = s.send(prepared, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert "generated_text" in r.json()


def test_missing_content_type_chat_is_accepted(server):
    req = requests.Request("POST", server.url + "/v1/chat/completions",
                           data=json.dumps({"messages": CHAT, "max_tokens": 2}).encode(), headers={})
    prepared = req.prepare()
    assert "Content-Type" not in prepared.headers
    with requests.Session() as s:
        r = s.send(prepared, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"


# ---- streaming requests with invalid parameters: 4xx before any stream byte ----

STREAM_INVALID = [
    ("/v1/chat/completions", "openai", {"messages": CHAT, "stream": True, "top_p": 1.5}),
    ("/v1/completions", "openai", {"prompt": "Hello", "stream": True, "top_p": 1.5}),
    ("/generate_stream", "tgi", {"inputs": "Hello", "parameters": {"top_p": 1.5}}),
    ("/invocations", "tgi", {"inputs": "Hello", "stream": True, "parameters": {"top_p": 1.5}}),
    ("/", "tgi", {"inputs": "Hello", "stream": True, "parameters": {"top_p": 1.5}}),
    ("/invocations", "openai", {"messages": CHAT, "stream": True, "top_p": 1.5}),
]


@pytest.mark.parametrize("path,flavor,body", STREAM_INVALID,
                         ids=[f"{p}-{'messages' if 'messages' in b else 'native'}" for p, _, b in STREAM_INVALID])
def test_streaming_request_with_invalid_params_gets_422_json(server, path, flavor, body):
    with requests.post(server.url + path, json=body, stream=True, timeout=TIMEOUT) as r:
        ctype = r.headers.get("content-type", "")
        assert "text/event-stream" not in ctype, f"the stream started: {r.status_code} {ctype}"
        raw = r.raw.read(100_000, decode_content=True)
    assert not raw.startswith(b"data:") and not raw.startswith(b":"), raw[:200]
    r._content = raw  # the bytes read above, for the shape checks
    msg = error_message(r, 422, flavor)
    assert "top_p" in msg and "1.0" in msg, msg
    ping_ok(server.url)


@pytest.mark.parametrize("path,body", [
    ("/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "stream": True}),
])
def test_valid_stream_ends_cleanly(server, path, body):
    """The control for the tests above: a valid stream is SSE and its chunked body ends properly
    (no error once the last event is out, which a client sees as a truncated response)."""
    with requests.post(server.url + path, json=body, stream=True, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        assert r.headers.get("content-type", "").startswith("text/event-stream")
        data = b""
        try:
            for chunk in r.iter_content(chunk_size=None):
                data += chunk
        except requests.exceptions.ChunkedEncodingError as exc:
            raise AssertionError(f"the stream ended prematurely after {data[-120:]!r}: {exc}") from None
    assert data.startswith(b"data:"), data[:100]
    assert b"Traceback" not in data
    if path.startswith("/v1/"):
        assert data.endswith(b"[DONE]\n\n"), data[-100:]
    else:
        assert b'"generated_text":null' not in data.rsplit(b"data:", 1)[1], data[-200:]
    ping_ok(server.url)


# ---- routes and methods ----

def test_unknown_route_is_404_json(server):
    r = post_url(server.url, "/no/such/route", {"inputs": "Hello"})
    msg = any_shape_message(r, 404)
    assert "/no/such/route" in msg, msg
    r = requests.get(server.url + "/v1/nothing", timeout=10)
    any_shape_message(r, 404)
    ping_ok(server.url)


@pytest.mark.parametrize("method,path", [("GET", "/generate"), ("GET", "/v1/chat/completions"),
                                         ("PUT", "/invocations"), ("DELETE", "/ping")])
def test_wrong_method_is_405_json(server, method, path):
    r = requests.request(method, server.url + path, timeout=10)
    msg = any_shape_message(r, 405)
    assert method in msg, msg
    ping_ok(server.url)


def test_unknown_fields_are_ignored(server):
    r = post_url(server.url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "foo": 1},
                                       "bar": {"x": [1]}})
    assert r.status_code == 200, r.text
    r = post_url(server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "foo": 1}],
                                                  "max_tokens": 2, "unknown_field": True})
    assert r.status_code == 200, r.text
    r = post_url(server.url, "/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}, "zzz": 1})
    assert r.status_code == 200, r.text
