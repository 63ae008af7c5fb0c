"""Small HTTP/SSE helpers shared by the client tests (plain `requests`, no mocks)."""

from __future__ import annotations

import json

import requests

TIMEOUT = 300  # the CI machine is slow (2 CPU cores); generations are short but may queue


def chat_body(question: str, max_tokens: int = 16, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def post(server, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=TIMEOUT, **kw)


def split_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into events (without their `\\n\\n` terminator); keep-alive comments dropped."""
    assert raw.endswith(b"\n\n"), f"SSE body does not end with a blank line: {raw[-80:]!r}"
    events = raw[:-2].split(b"\n\n")
    return [e for e in events if not e.startswith(b":")]


def data_of(event: bytes) -> str:
    """The payload of a single-line `data:` event (one optional space after the colon, as SSE allows)."""
    assert event.startswith(b"data:"), f"not a data event: {event!r}"
    assert b"\n" not in event, f"multi-line event: {event!r}"
    text = event[len(b"data:"):].decode()
    return text[1:] if text.startswith(" ") else text


def _openai_done(buf: bytes) -> bool:
    return b"data: [DONE]\n\n" in buf or b"data:[DONE]\n\n" in buf


def _native_done(buf: bytes) -> bool:
    if not buf.endswith(b"\n\n"):
        return False
    last = buf[:-2].rsplit(b"\n\n", 1)[-1]
    if not last.startswith(b"data:"):
        return False
    obj = json.loads(data_of(last))
    return "error" in obj or obj.get("generated_text") is not None


def read_stream(resp: requests.Response, native: bool = False) -> bytes:
    """Read an SSE body up to and including its terminal event ([DONE] for OpenAI routes, the
    event with generated_text for native ones), then close, as the SDKs do. Does not depend on
    how the server ends the chunked body (test_sse_and_sagemaker checks that separately)."""
    done = _native_done if native else _openai_done
    buf = b""
    try:
        for piece in resp.iter_content(chunk_size=None):
            buf += piece
            if done(buf):
                break
    finally:
        resp.close()
    return buf


def openai_stream_json(raw: bytes) -> list:
    """Chunks of an OpenAI SSE body as dicts, the final `[DONE]` as the string "[DONE]"."""
    out = []
    for ev in split_events(raw):
        payload = data_of(ev)
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chat_stream_text(chunks: list) -> tuple[str, list[str], dict | None]:
    """(content, finish reasons, usage) of parsed chat chunks."""
    text, finishes, usage = "", [], None
    for ch in chunks:
        if ch == "[DONE]":
            continue
        assert "error" not in ch, ch
        for choice in ch["choices"]:
            text += choice["delta"].get("content") or ""
            if choice.get("finish_reason") is not None:
                finishes.append(choice["finish_reason"])
        if ch.get("usage"):
            usage = ch["usage"]
    return text, finishes, usage


# ---- error answers: the shape, no traceback, and the server still serving ----

def post_url(url: str, path: str, body, **kw) -> requests.Response:
    return requests.post(url + path, json=body, timeout=TIMEOUT, **kw)


def ping_ok(url: str) -> None:
    r = requests.get(url + "/ping", timeout=10)
    assert r.status_code == 200, f"/ping answered {r.status_code} after the error: {r.text!r}"


def json_error(r: requests.Response, status: int) -> dict:
    assert "Traceback" not in r.text, r.text
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text!r}"
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"content-type {ctype!r}: {r.text!r}"
    return r.json()


def tgi_error(r: requests.Response, status: int) -> str:
    """Asserts TGI's {"error": str, "error_type": str}; returns the message."""
    body = json_error(r, status)
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("error_type"), str) and body["error_type"], body
    return body["error"]


def oai_error(r: requests.Response, status: int) -> dict:
    """Asserts OpenAI's {"error": {"message", "type", "param", "code"}}; returns the inner object."""
    body = json_error(r, status)
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
    body = json_error(r, status)
    if isinstance(body.get("error"), dict):
        return oai_error(r, status)["message"]
    return tgi_error(r, status)
