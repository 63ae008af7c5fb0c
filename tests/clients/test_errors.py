"""Bad input against the real server: a 4xx JSON body naming the field and the limit, in the TGI
shape on the native routes and the OpenAI shape on /v1, never a traceback, and /ping still 200."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from conftest import Server

TIMEOUT = 60
CHAT = [{"role": "user", "content": "Say hello."}]


# ---- helpers ----

def ping_ok(url: str) -> None:
    r = requests.get(url + "/ping", timeout=10)
    assert r.status_code == 200, f"/ping answered {r.status_code} after the error: {r.text!r}"


def _json_error(r: requests.Response, status: int) -> dict:
    assert "Traceback" not in r.text, r.text
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text!r}"
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"content-type {ctype!r}: {r.text!r}"
    return r.json()


def tgi_error(r: requests.Response, status: int) -> str:
    """Asserts TGI's {"error": str, "error_type": str}; returns the message."""
    body = _json_error(r, status)
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("error_type"), str) and body["error_type"], body
    return body["error"]


def oai_error(r: requests.Response, status: int) -> dict:
    """Asserts OpenAI's {"error": {"message", "type", "param", "code"}}; returns the inner object."""
    body = _json_error(r, status)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert isinstance(err.get("message"), str) and err["message"], body
    assert isinstance(err.get("type"), str) and err["type"], body
    assert "param" in err, body
    assert err.get("code") == status, body
    return err


def error_message(r: requests.Response, status: int, flavor: str) -> str:
    if flavor == "openai":
        return oai_error(r, status)["message"]
    return tgi_error(r, status)


def any_shape_message(r: requests.Response, status: int) -> str:
    body = _json_error(r, status)
    if isinstance(body.get("error"), dict):
        return oai_error(r, status)["message"]
    return tgi_error(r, status)


def post(url: str, path: str, body, **kw) -> requests.Response:
    return requests.post(url + path, json=body, timeout=TIMEOUT, **kw)


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
    r = post(server.url, "/generate", {"parameters": {"max_new_tokens": 2}})
    msg = tgi_error(r, 422)
    assert "inputs" in msg, msg
    ping_ok(server.url)


def test_missing_messages_is_422(server):
    r = post(server.url, "/v1/chat/completions", {"max_tokens": 2})
    err = oai_error(r, 422)
    assert "messages" in err["message"], err
    assert err["param"] == "messages", err
    ping_ok(server.url)


def test_wrong_typed_max_new_tokens_is_422(server):
    r = post(server.url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": "abc"}})
    msg = tgi_error(r, 422)
    assert "max_new_tokens" in msg, msg
    ping_ok(server.url)


def test_wrong_typed_messages_is_422(server):
    r = post(server.url, "/v1/chat/completions", {"messages": "hi", "max_tokens": 2})
    err = oai_error(r, 422)
    assert "messages" in err["message"], err
    assert err["param"] == "messages", err
    ping_ok(server.url)


def test_numeric_string_is_coerced_native(server):
    r = post(server.url, "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "5", "details": True}})
    assert r.status_code == 200, r.text
    assert r.json()["details"]["generated_tokens"] == 5, r.text
    ping_ok(server.url)


def test_numeric_string_is_coerced_openai(server):
    r = post(server.url, "/v1/chat/completions",
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
    r = post(server.url, path, body)
    msg = error_message(r, 422, flavor)
    assert field in msg, msg
    for w in words:
        w = w.format(**info)
        assert w in msg, f"{w!r} (the limit) missing from {msg!r}"
    if flavor == "openai":
        assert r.json()["error"]["param"] == field, r.text
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
    msg = error_message(post(server.url, path, body), 422, flavor)
    assert "stop" in msg and "16" in msg, msg
    ping_ok(server.url)


def test_sixteen_stop_sequences_are_accepted(server):
    stops = [f"zzstop{i}" for i in range(16)]
    r = post(server.url, "/generate", {"inputs": "Hello", "parameters": {"stop": stops, "max_new_tokens": 2}})
    assert r.status_code == 200, r.text


# ---- context limits ----

def test_prompt_longer_than_max_input_tokens_native(server, info):
    limit = info["max_input_tokens"]
    r = post(server.url, "/generate", {"inputs": "hello " * (limit + 800), "parameters": {"max_new_tokens": 2}})
    msg = tgi_error(r, 422)
    assert "inputs" in msg, msg
    assert str(limit) in msg or str(limit + 1) in msg, f"limit {limit} not named: {msg!r}"
    ping_ok(server.url)


def test_prompt_longer_than_max_input_tokens_chat(server, info):
    limit = info["max_input_tokens"]
    body = {"messages": [{"role": "user", "content": "hello " * (limit + 800)}], "max_tokens": 2}
    err = oai_error(post(server.url, "/v1/chat/completions", body), 422)
    assert "messages" in err["message"], err
    assert str(limit) in err["message"] or str(limit + 1) in err["message"], err
    ping_ok(server.url)


def test_prompt_plus_max_new_tokens_over_total_native(server, info):
    total = info["max_total_tokens"]
    requested = total - 10
    r = post(server.url, "/generate",
             {"inputs": "hello " * 100, "parameters": {"max_new_tokens": requested}})
    msg = tgi_error(r, 422)
    assert "max_new_tokens" in msg, msg
    assert str(total) in msg and str(requested) in msg, msg
    ping_ok(server.url)


def test_prompt_plus_max_tokens_over_total_chat(server, info):
    total = info["max_total_tokens"]
    requested = total - 10
    body = {"messages": [{"role": "user", "content": "hello " * 100}], "max_tokens": requested}
    err = oai_error(post(server.url, "/v1/chat/completions", body), 422)
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
    r = post(server.url, "/no/such/route", {"inputs": "Hello"})
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
    r = post(server.url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2, "foo": 1},
                                       "bar": {"x": [1]}})
    assert r.status_code == 200, r.text
    r = post(server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "foo": 1}],
                                                  "max_tokens": 2, "unknown_field": True})
    assert r.status_code == 200, r.text
    r = post(server.url, "/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}, "zzz": 1})
    assert r.status_code == 200, r.text


# ---- settings that need their own server ----

class TestPayloadLimit:
    @pytest.fixture(scope="class")
    def small(self):
        srv = Server(env={"PAYLOAD_LIMIT": "1000", "MAX_CONCURRENT_REQUESTS": "4"})
        yield srv
        srv.stop()

    @pytest.mark.parametrize("path,flavor", [("/generate", "tgi"), ("/invocations", "tgi"),
                                             ("/v1/chat/completions", "openai")])
    def test_oversized_body_is_413(self, small, path, flavor):
        big = "x" * 2000
        body = ({"messages": [{"role": "user", "content": big}], "max_tokens": 2} if flavor == "openai"
                else {"inputs": big, "parameters": {"max_new_tokens": 2}})
        msg = error_message(post(small.url, path, body), 413, flavor)
        assert "PAYLOAD_LIMIT" in msg and "1000" in msg, msg
        ping_ok(small.url)

    def test_oversized_chunked_body_is_413(self, small):
        # No Content-Length: the limit must hold on the bytes actually read.
        parts = iter([b'{"inputs": "', b"x" * 3000, b'", "parameters": {"max_new_tokens": 2}}'])
        r = requests.post(small.url + "/generate", data=parts, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
        msg = tgi_error(r, 413)
        assert "1000" in msg, msg
        ping_ok(small.url)

    def test_body_under_the_limit_is_served(self, small):
        r = post(small.url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text


class TestMessagesApiEnabled:
    @pytest.fixture(scope="class")
    def chat_only(self):
        srv = Server(env={"MESSAGES_API_ENABLED": "True", "MAX_CONCURRENT_REQUESTS": "4"})
        yield srv
        srv.stop()

    def test_invocations_accepts_messages(self, chat_only):
        r = post(chat_only.url, "/invocations", {"messages": CHAT, "max_tokens": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion", body
        assert isinstance(body["choices"][0]["message"]["content"], str)

    def test_invocations_refuses_inputs(self, chat_only):
        r = post(chat_only.url, "/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        err = oai_error(r, 422)  # a chat-only endpoint answers in the OpenAI shape
        assert "messages" in err["message"], err
        assert err["param"] == "messages", err
        ping_ok(chat_only.url)


class TestMessagesApiDisabled:
    @pytest.fixture(scope="class")
    def native_only(self):
        srv = Server(env={"MESSAGES_API_ENABLED": "false", "MAX_CONCURRENT_REQUESTS": "4"})
        yield srv
        srv.stop()

    def test_invocations_accepts_inputs(self, native_only):
        r = post(native_only.url, "/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body, list) and "generated_text" in body[0], body

    def test_invocations_refuses_messages(self, native_only):
        r = post(native_only.url, "/invocations", {"messages": CHAT, "max_tokens": 2})
        msg = any_shape_message(r, 422)
        assert "inputs" in msg, msg
        ping_ok(native_only.url)


# ---- overload ----

class _Reader(threading.Thread):
    """Keeps reading a streaming response until told to stop, then closes it."""

    def __init__(self, url, path, body):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.first = threading.Event()
        self.stop = threading.Event()
        self.finished_naturally = False
        self.status = None
        self.nbytes = 0
        self.error = None

    def run(self):
        try:
            with requests.post(self.url + self.path, json=self.body, stream=True, timeout=TIMEOUT) as r:
                self.status = r.status_code
                for chunk in r.iter_content(chunk_size=None):
                    self.nbytes += len(chunk)
                    self.first.set()
                    if self.stop.is_set():
                        break
                else:
                    self.finished_naturally = True
                # leaving the `with` closes the connection: the client went away
        except Exception as exc:  # noqa: BLE001
            self.error = exc
        finally:
            self.first.set()


class TestOverload:
    @pytest.fixture(scope="class")
    def tiny(self):
        srv = Server(env={"MAX_CONCURRENT_REQUESTS": "2"})
        yield srv
        srv.stop()

    def test_third_request_gets_429_and_disconnect_frees_the_slot(self, tiny):
        readers = [
            _Reader(tiny.url, "/generate_stream",
                    {"inputs": "Tell me a long story.", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}),
            _Reader(tiny.url, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200,
                     "ignore_eos": True, "stream": True}),
        ]
        for rd in readers:
            rd.start()
        try:
            for rd in readers:
                assert rd.first.wait(60), "a stream sent nothing within 60 s"
                assert rd.status == 200 and rd.error is None, (rd.status, rd.error)

            small = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
            t0 = time.monotonic()
            r = post(tiny.url, "/generate", small)
            elapsed = time.monotonic() - t0
            assert r.status_code == 429, r.text
            assert elapsed < 2.0, f"429 took {elapsed:.2f}s"
            tgi_error(r, 429)
            assert r.json()["error_type"] == "overloaded", r.text

            t0 = time.monotonic()
            r = post(tiny.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
            assert time.monotonic() - t0 < 2.0
            err = oai_error(r, 429)
            assert "overloaded" in err["message"].lower(), err

            r = post(tiny.url, "/invocations", small)
            tgi_error(r, 429)
            assert r.json()["error_type"] == "overloaded", r.text

            # Streaming requests are refused up front too, not inside a 200 stream.
            with requests.post(tiny.url + "/generate_stream", json=small, stream=True, timeout=TIMEOUT) as r:
                assert r.status_code == 429, r.status_code
                assert r.headers.get("content-type", "").startswith("application/json")

            for _ in range(3):
                t0 = time.monotonic()
                r = requests.get(tiny.url + "/ping", timeout=5)
                elapsed = time.monotonic() - t0
                assert r.status_code == 200, r.text
                assert elapsed < 0.5, f"/ping took {elapsed:.2f}s while streams were running"

            assert all(rd.is_alive() and not rd.finished_naturally for rd in readers), \
                "a stream finished before the overload checks; the test proves nothing"
        finally:
            for rd in readers:
                rd.stop.set()
            for rd in readers:
                rd.join(30)
        assert not any(rd.finished_naturally for rd in readers), "streams ended on their own"

        # The clients went away: both slots must come back long before the 200 tokens could finish.
        deadline = time.monotonic() + 15
        statuses = []
        while True:
            r = post(tiny.url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
            statuses.append(r.status_code)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.status_code == 200, f"slots not freed after the clients disconnected: {statuses} {r.text}"
        assert set(statuses) <= {200, 429}, statuses
        # Both slots, not only one: two concurrent requests are admitted.
        results = []

        def one():
            results.append(post(tiny.url, "/generate",
                                {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).status_code)

        deadline = time.monotonic() + 15
        while True:
            results.clear()
            ts = [threading.Thread(target=one) for _ in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(TIMEOUT)
            if results == [200, 200] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert results == [200, 200], results
        ping_ok(tiny.url)
