"""/invocations recognises a Responses body (`input`) and an Anthropic Messages body (Bedrock's,
naming `anthropic_version`), whole and streamed, with a fake engine (HTTP behaviour only)."""

from __future__ import annotations

import json

from fakes import REPLY, FakeRuntime, oai_error

from sagellm.server.app import create_app
from sagellm.settings import Settings

TEXT = "".join(REPLY)


def _client(env: dict | None = None):
    settings = Settings.from_env(env or {})
    app = create_app(settings, runtime=FakeRuntime(settings))
    app.testing = True
    return app.test_client()


def named_events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in raw.decode().strip().split("\n\n"):
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        out.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return out


def test_responses_body():
    c = _client()
    r = c.post("/invocations", json={"input": "Say hello", "max_output_tokens": 5})
    assert r.status_code == 200 and r.json["object"] == "response", r.json
    assert r.json["output"][0]["content"][0]["text"] == TEXT
    events = named_events(c.post("/invocations", json={"input": "Say hello", "stream": True}).data)
    assert events[0][0] == "response.created" and events[-1][0] == "response.incomplete"
    assert "".join(e["delta"] for k, e in events if k == "response.output_text.delta") == TEXT
    err = oai_error(c.post("/invocations", json={"input": "x", "background": True}), 400)
    assert err["param"] == "background"


def test_anthropic_body():
    c = _client({"MESSAGES_API_ENABLED": "true"})
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5,
            "messages": [{"role": "user", "content": "Say hello"}]}
    r = c.post("/invocations", json=body)
    assert r.status_code == 200 and r.json["type"] == "message" and r.json["content"][0]["text"] == TEXT, r.json
    events = named_events(c.post("/invocations", json={**body, "stream": True}).data)
    assert [k for k, _ in events][:2] == ["message_start", "content_block_start"] and events[-1][0] == "message_stop"
    r = c.post("/invocations", json={k: v for k, v in body.items() if k != "max_tokens"})
    assert r.status_code == 422 and r.json["type"] == "error" and "max_tokens" in r.json["error"]["message"]


def test_chat_bodies_still_chat_and_native_only_refuses_them():
    c = _client()
    r = c.post("/invocations", json={"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 5})
    assert r.json["object"] == "chat.completion", r.json
    r = _client({"MESSAGES_API_ENABLED": "false"}).post("/invocations", json={"input": "Say hello"})
    assert r.status_code == 422 and "inputs" in r.json["error"], r.json


def test_readme_stream_loop_reads_both_through_line_iterator():
    """The README's invoke_endpoint_with_response_stream loop, over the body cut at odd places."""
    from sagemaker.iterators import LineIterator

    c = _client()
    bodies = ({"input": "Say hello", "stream": True},
              {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "stream": True,
               "messages": [{"role": "user", "content": "Say hello"}]})
    for body in bodies:
        raw = c.post("/invocations", json=body).data
        parts = [{"PayloadPart": {"Bytes": raw[i:i + 7]}} for i in range(0, len(raw), 7)]
        text = ""
        for line in LineIterator(parts):
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if event["type"] == "response.output_text.delta":
                    text += event["delta"]
                elif event["type"] == "content_block_delta" and event["delta"]["type"] == "text_delta":
                    text += event["delta"]["text"]
        assert text == TEXT, (body, raw[:300])


def _failing(mode: str = "event"):
    settings = Settings.from_env({})
    rt = FakeRuntime(settings)
    rt.fake.fail_at, rt.fake.fail_mode = 1, mode
    app = create_app(settings, runtime=rt)
    app.testing = True
    return app.test_client(), rt


def test_engine_failure_ends_only_that_request_in_each_shape():
    for mode in ("event", "raise"):
        c, rt = _failing(mode)
        words = "CUDA out of memory" if mode == "event" else "internal error (RuntimeError)"
        err = oai_error(c.post("/v1/responses", json={"input": "Say hello"}), 424)
        assert words in err["message"] and "SECRET" not in err["message"], err
        raw = c.post("/v1/responses", json={"input": "Say hello", "stream": True}).data
        assert words.encode() in raw and b"SECRET" not in raw
        events = named_events(raw)
        assert [k for k, _ in events][-2:] == ["error", "response.failed"], events
        assert events[-1][1]["response"]["status"] == "failed"
        r = c.post("/v1/messages", json={"max_tokens": 5, "messages": [{"role": "user", "content": "Say hello"}]})
        assert r.status_code == 424 and r.json["error"]["type"] == "api_error", r.json
        assert words in r.json["error"]["message"] and "SECRET" not in r.text
        raw = c.post("/v1/messages", json={"max_tokens": 5, "stream": True, "messages": [
            {"role": "user", "content": "Say hello"}]}).data
        assert words.encode() in raw and b"SECRET" not in raw
        events = named_events(raw)
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error", events
        assert len(rt.fake.handles) == 4
        # A failed response is not stored.
        assert len(rt.ctx.store) == 0
