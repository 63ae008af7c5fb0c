"""Settings that need a server of their own: PAYLOAD_LIMIT (413), MESSAGES_API_ENABLED (what
/invocations accepts) and MAX_CONCURRENT_REQUESTS (429 at once, and a client that disconnects
gives its slot back). Errors keep their shape and /ping stays 200."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from conftest import Server
from helpers import TIMEOUT, any_shape_message, error_message, oai_error, ping_ok, post_url, tgi_error

CHAT = [{"role": "user", "content": "Say hello."}]


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
        msg = error_message(post_url(small.url, path, body), 413, flavor)
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
        r = post_url(small.url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text


class TestMessagesApiEnabled:
    @pytest.fixture(scope="class")
    def chat_only(self):
        srv = Server(env={"MESSAGES_API_ENABLED": "True", "MAX_CONCURRENT_REQUESTS": "4"})
        yield srv
        srv.stop()

    def test_invocations_accepts_messages(self, chat_only):
        r = post_url(chat_only.url, "/invocations", {"messages": CHAT, "max_tokens": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion", body
        assert isinstance(body["choices"][0]["message"]["content"], str)

    def test_invocations_refuses_inputs(self, chat_only):
        r = post_url(chat_only.url, "/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
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
        r = post_url(native_only.url, "/invocations", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body, list) and "generated_text" in body[0], body

    def test_invocations_refuses_messages(self, native_only):
        r = post_url(native_only.url, "/invocations", {"messages": CHAT, "max_tokens": 2})
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
            r = post_url(tiny.url, "/generate", small)
            elapsed = time.monotonic() - t0
            assert r.status_code == 429, r.text
            assert elapsed < 2.0, f"429 took {elapsed:.2f}s"
            tgi_error(r, 429)
            assert r.json()["error_type"] == "overloaded", r.text

            t0 = time.monotonic()
            r = post_url(tiny.url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
            assert time.monotonic() - t0 < 2.0
            err = oai_error(r, 429)
            assert "overloaded" in err["message"].lower(), err

            r = post_url(tiny.url, "/invocations", small)
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
            r = post_url(tiny.url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
            statuses.append(r.status_code)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert r.status_code == 200, f"slots not freed after the clients disconnected: {statuses} {r.text}"
        assert set(statuses) <= {200, 429}, statuses
        # Both slots, not only one: two concurrent requests are admitted.
        results = []

        def one():
            results.append(post_url(tiny.url, "/generate",
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
