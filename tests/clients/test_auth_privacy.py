"""API_KEY and private logs on the real server (issue 11, part 4): the key compared exactly (only
the word Bearer ignores case) on every route but /ping and /health; with LOG_PROMPTS unset no
user text reaches the log through validation errors; the start-up log shows no character of a
secret."""

from __future__ import annotations

import pytest
import requests

from conftest import Server
from helpers import TIMEOUT, oai_error, tgi_error

KEY = "Secret123-kq7Zw"
HF_TOKEN = "hf_TkLmNoPqRsTuVwXyZ0123"
PRIVATE = "zanzibar-quokka-7731"  # user text that must never reach the log


@pytest.fixture(scope="module")
def keyed():
    srv = Server(env={"API_KEY": KEY, "HF_TOKEN": HF_TOKEN, "MAX_CONCURRENT_REQUESTS": "4"})
    yield srv
    srv.stop()


def _auth(value: str) -> dict:
    return {"Authorization": value}


ROUTES = [  # (method, path, body)
    ("POST", "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}),
    ("POST", "/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}),
    ("POST", "/", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}),
    ("POST", "/invocations", {"inputs": "Hi", "parameters": {"max_new_tokens": 1}}),
    ("POST", "/tokenize", {"inputs": "Hi"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    ("GET", "/info", None),
    ("GET", "/v1/models", None),
    ("GET", "/metrics", None),
]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_needs_the_exact_key(keyed, method, path, body):
    def call(headers):
        return requests.request(method, keyed.url + path, json=body, headers=headers, timeout=TIMEOUT)

    refuse = oai_error if path.startswith("/v1/") else tgi_error
    for wrong in ({}, _auth(f"Bearer {KEY.upper()}"), _auth(f"Bearer {KEY.lower()}"), _auth(f"Bearer {KEY[:-1]}"),
                  _auth(f"Bearer {KEY}x"), _auth(KEY), _auth(f"Basic {KEY}"), _auth("Bearer ")):
        refuse(call(wrong), 401)
    for right in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}"):
        r = call(_auth(right))
        assert r.status_code == 200, (right, r.status_code, r.text[:300])


def test_only_the_health_checks_need_no_key(keyed):
    for path in ("/ping", "/health"):  # SageMaker's health check sends no key
        assert requests.get(keyed.url + path, timeout=10).status_code == 200, path
    for path in ("/info", "/v1/models", "/metrics"):
        assert requests.get(keyed.url + path, timeout=10).status_code == 401, path


BAD_WITH_TEXT = [  # bodies whose validation error quotes user text back to the client
    ("/v1/chat/completions", {"messages": PRIVATE, "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": PRIVATE, "content": "hi"}], "max_tokens": 1}),
    ("/invocations", {"action": PRIVATE}),
    ("/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": f"({PRIVATE}"}}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                              "tools": [{"type": "function", "function": {"name": PRIVATE}}],
                              "tool_choice": {"type": "function", "function": {"name": PRIVATE + "-other"}}}),
    ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": PRIVATE}}),
]


def test_validation_errors_keep_user_text_out_of_the_log(keyed):
    for path, body in BAD_WITH_TEXT:
        r = requests.post(keyed.url + path, json=body, headers=_auth(f"Bearer {KEY}"), timeout=TIMEOUT)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    log = keyed.log_path.read_text()
    assert PRIVATE not in log, [line for line in log.splitlines() if PRIVATE in line]
    assert '"status":422' in log and '"param":' in log  # the class and the field are still there


def test_start_up_log_shows_no_character_of_a_secret(keyed):
    log = keyed.log_path.read_text()
    assert "api_key=*** (from API_KEY)" in log and "hf_token=*** (from HF_TOKEN)" in log, log[:3000]
    for secret in (KEY, HF_TOKEN):
        assert secret[:4] not in log, secret[:4]
