"""HTTP behaviour of the Flask app with a fake engine (no model): readiness, health, auth, SSE
framing, admission (429) and error mapping, through Flask's test client."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fakes import CHAT, NATIVE, REPLY, VOCAB, FakeRuntime, oai_error, sse_events, tgi_error

from sagellm.server.app import create_app
from sagellm.settings import Settings


@pytest.fixture
def make():
    def build(env: dict | None = None):
        settings = Settings.from_env(env or {})
        rt = FakeRuntime(settings)
        app = create_app(settings, runtime=rt)
        app.testing = True
        return app, rt
    return build


@pytest.fixture
def app_rt(make):
    return make()


@pytest.fixture
def client(app_rt):
    return app_rt[0].test_client()


# ---- readiness and health ----

def test_ping_503_while_loading_then_200(app_rt):
    app, rt = app_rt
    c = app.test_client()
    rt.state = "loading"
    rt.health = (False, "loading")
    for path in ("/ping", "/health"):
        r = c.get(path)
        assert r.status_code == 503, path
        assert "Traceback" not in r.get_data(as_text=True)
    assert c.post("/ping").status_code == 503
    rt.state = "ready"
    rt.health = (True, "ok")
    assert c.get("/ping").status_code == 200
    assert c.post("/ping").status_code == 200
    assert c.get("/health").status_code == 200


@pytest.mark.parametrize("path,body,flavor", [
    ("/generate", NATIVE, "tgi"),
    ("/generate_stream", NATIVE, "tgi"),
    ("/", NATIVE, "tgi"),
    ("/invocations", NATIVE, "tgi"),
    ("/v1/chat/completions", {"messages": CHAT}, "openai"),
    ("/v1/completions", {"prompt": "hi"}, "openai"),
    ("/invocations", {"messages": CHAT}, "openai"),
])
def test_generation_routes_answer_503_json_while_loading(app_rt, path, body, flavor):
    app, rt = app_rt
    rt.state = "loading"
    rt.health = (False, "loading")
    r = app.test_client().post(path, json=body)
    if flavor == "tgi":
        msg = tgi_error(r, 503)
        assert r.get_json()["error_type"] == "unhealthy"
    else:
        msg = oai_error(r, 503)["message"]
    assert "not ready" in msg or "loading" in msg, msg
    assert rt.fake.handles == [], "a request reached the engine before it was ready"


def test_info_routes_answer_503_while_loading(app_rt):
    app, rt = app_rt
    rt.state = "loading"
    c = app.test_client()
    tgi_error(c.get("/info"), 503)
    oai_error(c.get("/v1/models"), 503)
    rt.state = "ready"
    assert c.get("/info").status_code == 200
    assert c.get("/v1/models").status_code == 200


def test_ping_503_when_unhealthy(app_rt):
    app, rt = app_rt
    rt.health = (False, "the engine stopped")
    c = app.test_client()
    r = c.get("/ping")
    assert r.status_code == 503
    assert "the engine stopped" in r.get_data(as_text=True)
    assert c.get("/health").status_code == 503
    rt.health = (True, "ok")
    assert c.get("/ping").status_code == 200


def test_ping_200_has_empty_body(client):
    r = client.get("/ping")
    assert r.status_code == 200
    assert r.get_data() == b""


# ---- auth ----

def test_api_key(make):
    app, rt = make({"API_KEY": "s3cret-key"})
    c = app.test_client()
    r = c.post("/generate", json=NATIVE)
    assert "authorization" in tgi_error(r, 401).lower()
    tgi_error(c.post("/generate", json=NATIVE, headers={"Authorization": "Bearer wrong"}), 401)
    oai_error(c.post("/v1/chat/completions", json={"messages": CHAT}), 401)
    assert "s3cret-key" not in r.get_data(as_text=True)
    assert rt.fake.handles == []
    r = c.post("/generate", json=NATIVE, headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["generated_text"] == "".join(REPLY)
    r = c.post("/v1/chat/completions", json={"messages": CHAT}, headers={"Authorization": "bearer s3cret-key"})
    assert r.status_code == 200, r.get_data(as_text=True)
    # the health checks stay open; every other route needs the key
    assert c.get("/ping").status_code == 200
    assert c.get("/health").status_code == 200
    for path in ("/info", "/v1/models", "/metrics"):
        tgi_error(c.get(path), 401) if not path.startswith("/v1") else oai_error(c.get(path), 401)
        assert c.get(path, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200, path
    tgi_error(c.post("/tokenize", json=NATIVE), 401)
    # only the scheme ignores case: the key is compared exactly
    tgi_error(c.post("/generate", json=NATIVE, headers={"Authorization": "Bearer S3CRET-KEY"}), 401)
    tgi_error(c.post("/generate", json=NATIVE, headers={"Authorization": "Bearer s3cret-ke"}), 401)


def test_no_api_key_means_no_auth(client):
    assert client.post("/generate", json=NATIVE).status_code == 200


# ---- SSE framing ----

def test_native_stream_framing(app_rt):
    app, rt = app_rt
    r = app.test_client().post("/generate_stream", json=NATIVE)
    assert r.status_code == 200
    assert r.mimetype == "text/event-stream"
    assert r.headers.get("Cache-Control") == "no-cache"
    assert r.headers.get("X-Accel-Buffering") == "no"
    assert "Content-Length" not in r.headers
    events = sse_events(r.get_data())
    assert b"[DONE]" not in r.get_data(), "native streams have no [DONE]"
    docs = [json.loads(e) for e in events]
    assert [d["token"]["text"] for d in docs] == REPLY
    assert [d["token"]["id"] for d in docs] == list(VOCAB)
    assert [d["index"] for d in docs] == [0, 1, 2]
    assert all(d["generated_text"] is None for d in docs[:-1])
    assert docs[-1]["generated_text"] == "".join(REPLY)
    assert rt.fake.aborts == [], "a finished stream must not be aborted"


def test_native_invocations_stream_returns_full_text(app_rt):
    app, _ = app_rt
    r = app.test_client().post("/invocations", json={**NATIVE, "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    docs = [json.loads(e) for e in sse_events(r.get_data())]
    assert docs[-1]["generated_text"] == NATIVE["inputs"] + "".join(REPLY)


def test_chat_stream_framing(app_rt):
    app, rt = app_rt
    r = app.test_client().post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
    assert r.status_code == 200
    assert r.mimetype == "text/event-stream"
    events = sse_events(r.get_data())
    assert events[-1] == b"[DONE]", events[-1]
    assert r.get_data().endswith(b"[DONE]\n\n")
    docs = [json.loads(e) for e in events[:-1]]
    assert all(d["object"] == "chat.completion.chunk" for d in docs)
    assert docs[0]["choices"][0]["delta"].get("role") == "assistant"
    text = "".join(d["choices"][0]["delta"].get("content") or "" for d in docs)
    assert text == "".join(REPLY)
    assert docs[-1]["choices"][0]["finish_reason"] == "length"
    assert len({d["id"] for d in docs}) == 1


def test_closing_a_stream_aborts_and_frees_the_slot(make):
    app, rt = make({"MAX_CONCURRENT_REQUESTS": "1"})
    c = app.test_client()
    r = c.post("/generate_stream", json=NATIVE, buffered=False)
    assert r.status_code == 200
    it = iter(r.response)
    first = next(it)
    assert first.startswith(b"data:")
    # The slot is held while the stream is open.
    tgi_error(app.test_client().post("/generate", json=NATIVE), 429)
    r.close()  # the client went away
    assert rt.fake.aborts == [rt.fake.handles[0].request_id]
    r2 = app.test_client().post("/generate", json=NATIVE)
    assert r2.status_code == 200, r2.get_data(as_text=True)


# ---- admission ----

def test_429_when_the_only_slot_is_busy(make):
    app, rt = make({"MAX_CONCURRENT_REQUESTS": "1"})
    rt.fake.gate = threading.Event()
    results = {}

    def first():
        results["r"] = app.test_client().post("/generate", json=NATIVE)

    t = threading.Thread(target=first, daemon=True)
    t.start()
    try:
        assert rt.fake.waiting.wait(5), "the first request never reached the engine"
        t0 = time.monotonic()
        r = app.test_client().post("/generate", json=NATIVE)
        assert time.monotonic() - t0 < 1.0
        msg = tgi_error(r, 429)
        assert r.get_json()["error_type"] == "overloaded"
        assert "MAX_CONCURRENT_REQUESTS" in msg or "overloaded" in msg.lower(), msg
        assert r.headers.get("Retry-After") == "1"
        err = oai_error(app.test_client().post("/v1/chat/completions", json={"messages": CHAT}), 429)
        assert err["type"] == "rate_limit_error", err
        # a streaming request is refused before any stream byte
        r = app.test_client().post("/generate_stream", json=NATIVE)
        tgi_error(r, 429)
        assert len(rt.fake.handles) == 1, "refused requests must not reach the engine"
        # health is not subject to admission
        assert app.test_client().get("/ping").status_code == 200
    finally:
        rt.fake.gate.set()
        t.join(10)
    assert results["r"].status_code == 200, results["r"].get_data(as_text=True)
    rt.fake.gate = None
    r = app.test_client().post("/generate", json=NATIVE)
    assert r.status_code == 200, r.get_data(as_text=True)


def test_refused_requests_do_not_consume_slots(make):
    app, rt = make({"MAX_CONCURRENT_REQUESTS": "1"})
    c = app.test_client()
    for _ in range(3):  # validation errors after admission must release the slot
        tgi_error(c.post("/generate", json={"inputs": "a", "parameters": {"top_p": 5}}), 422)
        oai_error(c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 0}), 422)
    assert c.post("/generate", json=NATIVE).status_code == 200


# ---- failures inside the engine ----

@pytest.mark.parametrize("path,body,flavor", [
    ("/generate", NATIVE, "tgi"),
    ("/generate_stream", NATIVE, "tgi"),
    ("/invocations", NATIVE, "tgi"),
    ("/v1/chat/completions", {"messages": CHAT}, "openai"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True}, "openai"),
    ("/v1/completions", {"prompt": "hi"}, "openai"),
])
def test_exception_in_submit_is_json_without_traceback(make, path, body, flavor):
    app, rt = make({"MAX_CONCURRENT_REQUESTS": "1"})
    rt.fake.submit_error = RuntimeError("kaboom SECRET-INTERNAL-DETAIL")
    c = app.test_client()
    r = c.post(path, json=body)
    assert r.status_code in (424, 500), r.status_code
    if flavor == "tgi":
        tgi_error(r, r.status_code)
    else:
        oai_error(r, r.status_code)
    text = r.get_data(as_text=True)
    assert "SECRET-INTERNAL-DETAIL" not in text and "sagellm/" not in text, text
    # the slot came back
    rt.fake.submit_error = None
    assert c.post(path, json=body).status_code == 200


def test_exception_while_collecting_is_json_without_traceback(make):
    app, rt = make({"MAX_CONCURRENT_REQUESTS": "1"})
    rt.fake.fail_at, rt.fake.fail_mode = 1, "raise"
    c = app.test_client()
    r = c.post("/generate", json=NATIVE)
    assert r.status_code in (424, 500), r.status_code
    tgi_error(r, r.status_code)
    assert "SECRET-INTERNAL-DETAIL" not in r.get_data(as_text=True)
    rt.fake.fail_at = None
    assert c.post("/generate", json=NATIVE).status_code == 200


def test_engine_error_event_non_streaming_is_424(app_rt):
    app, rt = app_rt
    rt.fake.fail_at = 1
    c = app.test_client()
    msg = tgi_error(c.post("/generate", json=NATIVE), 424)
    assert "CUDA out of memory" in msg and c.post("/generate", json=NATIVE).get_json()["error_type"] == "generation"
    err = oai_error(c.post("/v1/chat/completions", json={"messages": CHAT}), 424)
    assert "CUDA out of memory" in err["message"]


def test_engine_error_event_inside_streams(app_rt):
    app, rt = app_rt
    rt.fake.fail_at = 1
    c = app.test_client()
    r = c.post("/generate_stream", json=NATIVE)
    assert r.status_code == 200
    docs = [json.loads(e) for e in sse_events(r.get_data())]
    assert docs[0]["token"]["text"] == REPLY[0]
    assert "CUDA out of memory" in docs[-1]["error"] and docs[-1]["error_type"] == "generation", docs[-1]
    r = c.post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
    events = sse_events(r.get_data())
    assert events[-1] == b"[DONE]"
    last = json.loads(events[-2])
    assert "CUDA out of memory" in last["error"]["message"], last


def test_echo_scoring_without_prompt_logprobs_fails_not_guesses(app_rt):
    """An engine that returns no prompt logprobs (the fake here) fails an echo-with-logprobs
    request: scores missing the prompt's entries would shift every evaluation silently."""
    app, rt = app_rt
    c = app.test_client()
    body = {"prompt": "a b c", "echo": True, "logprobs": 1, "max_tokens": 2}
    err = oai_error(c.post("/v1/completions", json=body), 424)
    assert "prompt logprobs" in err["message"], err
    assert rt.fake.handles[-1].params.prompt_logprobs and rt.fake.handles[-1].params.prompt_top_n == 1
    events = sse_events(c.post("/v1/completions", json={**body, "stream": True}).get_data())
    assert events[-1] == b"[DONE]" and "prompt logprobs" in json.loads(events[-2])["error"]["message"]
    # echo alone needs none: the prompt's text, then the reply
    r = c.post("/v1/completions", json={"prompt": "a b c", "echo": True, "max_tokens": 2})
    assert r.status_code == 200 and r.get_json()["choices"][0]["text"] == "a b c" + "".join(REPLY)
    assert not rt.fake.handles[-1].params.prompt_logprobs


# ---- body handling ----

def test_unsupported_media_type_is_415(client):
    r = client.post("/generate", data=b"<html>", headers={"Content-Type": "text/html"})
    assert "Content-Type" in tgi_error(r, 415)


def test_json_in_text_plain_is_accepted(client):
    r = client.post("/generate", data=json.dumps(NATIVE), headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.get_data(as_text=True)


def test_payload_limit_is_413(make):
    app, rt = make({"PAYLOAD_LIMIT": "500"})
    c = app.test_client()
    r = c.post("/generate", json={"inputs": "x " * 400})
    msg = tgi_error(r, 413)
    assert "500" in msg and "PAYLOAD_LIMIT" in msg, msg
    oai_error(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 600}]}), 413)
    assert rt.fake.handles == []
    assert c.post("/generate", json=NATIVE).status_code == 200


def test_request_id_header_is_echoed(client):
    r = client.post("/generate", json=NATIVE, headers={"X-Amzn-RequestId": "abc-123"})
    assert r.headers.get("x-request-id") == "abc-123"
    r = client.post("/generate", json={"inputs": "a", "parameters": {"top_p": 5}},
                    headers={"X-Amzn-RequestId": "err-1"})
    assert r.status_code == 422 and r.headers.get("x-request-id") == "err-1"
