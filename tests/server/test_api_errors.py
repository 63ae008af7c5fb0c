"""Errors under /v1 in OpenAI's shape and under /v1/messages in Anthropic's, for routes that exist
and routes that do not (a 404 names the route), with a fake engine (HTTP behaviour only)."""

from __future__ import annotations

import json

import pytest
from fakes import FakeRuntime, oai_error, tgi_error

from sagellm.server.app import create_app
from sagellm.settings import Settings


def _client(env: dict | None = None):
    settings = Settings.from_env(env or {})
    app = create_app(settings, runtime=FakeRuntime(settings))
    app.testing = True
    return app.test_client()


def anthropic_error(resp, status: int) -> dict:
    text = resp.get_data(as_text=True)
    assert resp.status_code == status and resp.mimetype == "application/json", (resp.status_code, text)
    body = json.loads(text)
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


@pytest.mark.parametrize("method,path", [("GET", "/v1/nothing"), ("POST", "/v1/nothing/deeper"), ("GET", "/v1"),
                                         ("POST", "/v1/responses/x/y")])
def test_unknown_v1_route_is_an_openai_404_naming_it(method, path):
    err = oai_error(_client().open(path, method=method, json={}), 404)
    assert err["type"] == "not_found_error" and path in err["message"] and method in err["message"], err


def test_wrong_method_under_v1_is_an_openai_405():
    err = oai_error(_client().put("/v1/chat/completions", json={}), 405)
    assert "PUT" in err["message"] and "/v1/chat/completions" in err["message"], err


def test_unknown_route_under_v1_messages_is_anthropic_shaped():
    err = anthropic_error(_client().post("/v1/messages/nothing", json={}), 404)
    assert err["type"] == "not_found_error" and "/v1/messages/nothing" in err["message"], err


def test_routes_outside_v1_keep_tgi_errors():
    assert "/nothing" in tgi_error(_client().get("/nothing"), 404)
def test_v1_messages_errors_are_anthropic_shaped():
    c = _client()
    err = anthropic_error(c.post("/v1/messages", data=b"{not json", content_type="application/json"), 400)
    assert err["type"] == "invalid_request_error", err
    err = anthropic_error(c.post("/v1/messages", json={"messages": [{"role": "user", "content": "hi"}]}), 422)
    assert "max_tokens" in err["message"], err


def test_x_api_key_is_accepted_on_v1_messages_only():
    c = _client({"API_KEY": "sekret"})
    body = {"max_tokens": 3, "messages": [{"role": "user", "content": "Say hello"}]}
    assert anthropic_error(c.post("/v1/messages", json=body), 401)["type"] == "authentication_error"
    assert anthropic_error(c.post("/v1/messages", json=body, headers={"x-api-key": "wrong"}), 401)
    assert c.post("/v1/messages", json=body, headers={"x-api-key": "sekret"}).status_code == 200
    assert c.post("/v1/messages", json=body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    chat = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 3}
    oai_error(c.post("/v1/chat/completions", json=chat, headers={"x-api-key": "sekret"}), 401)
