"""Bad input is a JSON 4xx, never a 5xx, an HTML page or a reset connection (issue 11, part 2):
deep nesting, lone surrogates, unknown chat roles, an unbounded /tokenize, the requests gunicorn
refuses itself (raw sockets), a body over PAYLOAD_LIMIT, and a bounded fuzz over every route."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import socket
import threading

import pytest
import requests

from helpers import TIMEOUT, error_message, oai_error, ping_ok, post_url, tgi_error

CHAT = [{"role": "user", "content": "Say hello."}]
# Every route that reads a JSON body, with its error shape.
ROUTES = [("/generate", "tgi"), ("/generate_stream", "tgi"), ("/", "tgi"), ("/invocations", "tgi"),
          ("/tokenize", "tgi"), ("/v1/chat/completions", "openai"), ("/v1/completions", "openai")]
IDS = [r[0] for r in ROUTES]


def _post_text(url: str, path: str, text: str | bytes) -> requests.Response:
    return requests.post(url + path, data=text, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


@pytest.mark.parametrize("path,flavor", ROUTES, ids=IDS)
def test_json_nested_10000_deep_is_400(server, path, flavor):
    deep = "[" * 10000 + "]" * 10000
    msg = error_message(_post_text(server.url, path, '{"inputs": %s, "prompt": %s}' % (deep, deep)), 400, flavor)
    assert "deep" in msg, msg
    ping_ok(server.url)


@pytest.mark.parametrize("path,flavor", ROUTES, ids=IDS)
def test_lone_surrogate_is_400(server, path, flavor):
    text = ('{"inputs": "a\\ud800b", "prompt": "a\\ud800b", '
            '"messages": [{"role": "user", "content": "a\\udc00"}], "max_tokens": 2}')
    msg = error_message(_post_text(server.url, path, text), 400, flavor)
    assert "surrogate" in msg, msg
    ping_ok(server.url)
    # A surrogate pair is one character, not an error.
    r = _post_text(server.url, "/tokenize", '{"inputs": "smile \\ud83d\\ude00"}')
    assert r.status_code == 200, r.text
    assert "".join(t["text"] for t in r.json()).endswith("\U0001F600")


def test_tokenize_is_bounded_by_max_input_tokens(server):
    limit = requests.get(server.url + "/info", timeout=10).json()["max_input_tokens"]
    msg = tgi_error(post_url(server.url, "/tokenize", {"inputs": "hello " * (limit + 10)}), 422)
    assert "MAX_INPUT_TOKENS" in msg and str(limit) in msg, msg
    r = post_url(server.url, "/tokenize", {"inputs": "hello " * (limit + 10), "parameters": {"truncate": 5}})
    assert r.status_code == 200 and len(r.json()) == 5, r.text
    # Byte offsets of multi-byte text, computed in one pass.
    r = post_url(server.url, "/tokenize", {"inputs": "héllo wörld"})
    assert r.status_code == 200, r.text
    raw = "héllo wörld".encode()
    assert all(raw[t["start"]:t["stop"]].decode(errors="replace").strip() in t["text"] or not t["text"]
               for t in r.json()), r.json()
    assert r.json()[-1]["stop"] == len(raw)


# A text far over MAX_INPUT_TOKENS (3.9 MB, under PAYLOAD_LIMIT): refused by its length before the
# tokenizer sees it ("at least", where a count after tokenizing gives the exact number, ~900,000).
HUGE = "hello world, " * 300_000
HUGE_BODIES = [("/tokenize", "tgi", "inputs", {"inputs": HUGE}),
               ("/generate", "tgi", "inputs", {"inputs": HUGE, "parameters": {"max_new_tokens": 2}}),
               ("/invocations", "tgi", "inputs", {"inputs": HUGE, "action": "tokenize"}),
               ("/v1/completions", "openai", "prompt", {"prompt": ["Hi", HUGE], "max_tokens": 2}),
               ("/v1/chat/completions", "openai", "messages",
                {"messages": [{"role": "user", "content": HUGE}], "max_tokens": 2})]


@pytest.mark.parametrize("path,flavor,field,body", HUGE_BODIES, ids=[b[0] for b in HUGE_BODIES])
def test_text_far_over_max_input_tokens_is_refused_untokenized(server, path, flavor, field, body):
    limit = requests.get(server.url + "/info", timeout=10).json()["max_input_tokens"]
    r = post_url(server.url, path, body)
    msg = error_message(r, 422, flavor)
    assert f"`{field}` must have less than {limit + 1} tokens" in msg and f"MAX_INPUT_TOKENS={limit}" in msg, msg
    assert "characters, at least" in msg, msg
    if flavor == "openai":
        assert oai_error(r, 422)["param"] == field
    ping_ok(server.url)
    assert post_url(server.url, "/tokenize", {"inputs": "hello"}).status_code == 200


@pytest.mark.parametrize("role", ["robot", "System", ""])
def test_unknown_chat_role_is_422(server, role):
    messages = [{"role": "user", "content": "hi"}, {"role": role, "content": "hi"}]
    err = oai_error(post_url(server.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 2}), 422)
    assert err["param"] == "messages[1].role", err
    for allowed in ("system", "developer", "user", "assistant", "tool"):
        assert allowed in err["message"], err


def test_developer_role_is_the_system_message(server):
    def prompt(role):
        messages = [{"role": role, "content": "Answer in French."}, {"role": "user", "content": "Say hi."}]
        r = post_url(server.url, "/invocations", {"action": "apply_chat_template", "messages": messages})
        assert r.status_code == 200, r.text
        return r.json()["prompt"]
    assert prompt("developer") == prompt("system")
    assert "developer" not in prompt("developer")


# ---- what gunicorn refuses before the app sees it, over a raw socket ----

def _raw(server, data: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("data,status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /info HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"GET /info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n", 431),
    (b"NOT A REQUEST\r\n\r\n", 400),
    (b"GET /info HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
], ids=["414-uri", "431-count", "431-size", "400-line", "400-header"])
def test_gunicorn_refusals_are_json(server, data, status):
    got, headers, body = _raw(server, data)
    assert got == status, body
    assert headers.get("Content-Type") == "application/json", (headers, body)
    obj = json.loads(body)
    assert isinstance(obj["error"], str) and obj["error"] and obj["error_type"] == "validation", obj
    ping_ok(server.url)


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
def test_body_over_payload_limit_gets_its_413(server, connection):
    """http.client (under urllib, boto3's and many SDKs' transports) sends the whole body before
    reading the answer: when the server closes without reading the body (Connection: close), the
    send fails with a reset and the 413 is never read."""
    body = b"x" * (8_000_000 + 24_000_000)  # over PAYLOAD_LIMIT's default, and over the socket buffers
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json",
                                                               "Connection": connection})
        r = conn.getresponse()
        status, ctype, payload = r.status, r.getheader("Content-Type"), r.read()
    finally:
        conn.close()
    assert status == 413 and ctype == "application/json", (status, ctype, payload[:300])
    assert "PAYLOAD_LIMIT" in json.loads(payload)["error"], payload
    ping_ok(server.url)


# ---- fuzz: every route, mutated bodies; every answer a 2xx or a JSON 4xx ----

VALID = {
    "/generate": {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "temperature": 0.5, "top_p": 0.9,
                                                  "top_k": 5, "seed": 1, "stop": ["x"], "details": True}},
    "/generate_stream": {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "top_n_tokens": 2}},
    "/": {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "repetition_penalty": 1.1}},
    "/invocations": {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "typical_p": 0.9}},
    "/tokenize": {"inputs": "Hi there", "parameters": {"truncate": 2}},
    "/v1/chat/completions": {"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                             "max_tokens": 1, "logprobs": True, "top_logprobs": 2, "n": 2,
                             "logit_bias": {"5": 1.0}, "response_format": {"type": "json_object"},
                             "frequency_penalty": 0.5, "stream": False},
    "/v1/completions": {"prompt": ["Hi", "Yo"], "max_tokens": 1, "logprobs": 1, "echo": True,
                        "presence_penalty": 0.1, "stop": "x"},
}
ODD = [None, True, False, 0, -1, 1, 2**63, -2**63, 1e308, -1e-45, 0.5, float("nan"), float("inf"),
       float("-inf"), "", "x", "²", "\u0000", "\U0001F600", "a" * 300, [], [1], {}, {"a": 1},
       {"type": "json_schema", "json_schema": {"schema": {"$ref": "#"}}}, [[[[[]]]]], "-1", "1e9", "\ud800",
       {"60000": 1}, {"²": 1}, [[[[[[[[[[[[1]]]]]]]]]]]]]
CASES = int(os.environ.get("SAGELLM_FUZZ_CASES", "2000"))  # fewer on a loaded machine


def _mutate(rng: random.Random, value, depth: int = 0):
    """A random edit of one place in a body: replace, delete, add a key, or descend."""
    if isinstance(value, dict) and value and depth < 4 and rng.random() < 0.7:
        key = rng.choice(list(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[rng.choice(["stream", "n", "best_of", "tools", "tool_choice", "action", "grammar",
                            "response_format", "messages", "seed", "truncate", "logprobs", "role"])] = rng.choice(ODD)
        else:
            out[key] = _mutate(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and depth < 4 and rng.random() < 0.6:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = _mutate(rng, out[i], depth + 1)
        return out
    return rng.choice(ODD)


def _bounded(path: str, body):
    """A mutation that drops the length (or all the parameters) would generate up to the whole
    context; put a length of 1 back so the fuzz stays short. Invalid lengths stay as they are."""
    if not isinstance(body, dict) or path == "/tokenize":
        return body
    if "max_tokens" in VALID[path]:
        return body if body.get("max_tokens") is not None else {**body, "max_tokens": 1}
    params = body.get("parameters")
    if params is None or (isinstance(params, dict) and params.get("max_new_tokens") is None):
        return {**body, "parameters": {**(params or {}), "max_new_tokens": 1}}
    return body


def _as_text(rng: random.Random, body) -> bytes:
    text = json.dumps(body)  # NaN and Infinity as JavaScript writes them
    roll = rng.random()
    if roll < 0.05:
        return text[:rng.randrange(len(text) + 1)].encode()  # truncated
    if roll < 0.08:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))  # not JSON, maybe not UTF-8
    return text.encode()


def test_fuzz_every_route(server):
    rng = random.Random(20261129)
    cases = []
    for _ in range(CASES):
        path = rng.choice(list(VALID))
        body = VALID[path]
        for _ in range(rng.randint(1, 3)):
            body = _mutate(rng, body)
        cases.append((path, _as_text(rng, _bounded(path, body))))
    local = threading.local()

    def send(case):
        path, data = case
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = local.session.post(server.url + path, data=data, headers={"Content-Type": "application/json"},
                               timeout=TIMEOUT)
        return r.status_code, r.headers.get("content-type", ""), r.text

    # Eight at a time (under MAX_CONCURRENT_REQUESTS): the engine batches the ones that generate.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, cases))
    seen: dict[int, int] = {}
    for i, ((path, data), (status, ctype, text)) in enumerate(zip(cases, answers)):
        seen[status] = seen.get(status, 0) + 1
        case = f"case {i}: POST {path} {data[:300]!r} -> {status} {text[:300]!r}"
        # 424 is a request that passed validation and failed in the engine: the edge missed it.
        assert 200 <= status < 300 or (400 <= status < 500 and status != 424), case
        if status >= 400:
            assert ctype.startswith("application/json") and "error" in json.loads(text), case
    print("fuzz answers by status:", dict(sorted(seen.items())))  # docs/reliability.md quotes them (pytest -s)
    assert sum(seen.values()) == CASES and any(400 <= s < 500 for s in seen) and any(s < 300 for s in seen), seen
    r = post_url(server.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    ping_ok(server.url)
