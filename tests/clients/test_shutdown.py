"""Stopping as SageMaker needs it, through real gunicorn and real signals: after SIGTERM /ping
and new requests get a 503 JSON at once, running requests finish, the ones still running at
GRACEFUL_TERMINATION_TIMEOUT end with an error event and their terminator (a plain answer with a
503), and the server exits 0; when the engine thread dies, requests get 503 and the server exits
non-zero at once."""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time
from pathlib import Path

import requests

from conftest import Server
from helpers import chat_body, split_events

LONG = 4000  # tokens: far more than the tiny model makes in the drain window on this machine


class Call(threading.Thread):
    """One request in its own thread, its whole body read until the server closes it."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url + path, path, body
        self.first_byte = threading.Event()
        self.status: int | None = None
        self.raw = b""
        self.error: Exception | None = None
        self.start()

    def run(self):
        try:
            with requests.post(self.url, json=self.body, stream=True, timeout=120) as r:
                self.status = r.status_code
                for piece in r.iter_content(chunk_size=None):
                    self.raw += piece
                    self.first_byte.set()
        except Exception as exc:  # a stream cut mid-chunk shows here
            self.error = exc
        finally:
            self.first_byte.set()

    def events(self) -> list[str]:
        assert self.error is None, f"{self.path}: {self.error!r} after {self.raw[-300:]!r}"
        return [e[len(b"data:"):].decode().strip() for e in split_events(self.raw)]


def _long_chat(stream: bool) -> dict:
    return chat_body("Count from one to a million.", max_tokens=LONG, ignore_eos=True, stream=stream)


def _long_tgi() -> dict:
    return {"inputs": "Once upon a time", "parameters": {"max_new_tokens": LONG, "ignore_eos": True}}


def _assert_openai_stream_cut(call: Call, status: int) -> None:
    events = call.events()
    assert events[-1] == "[DONE]", events[-3:]
    err = json.loads(events[-2])["error"]
    assert err["code"] == status and err["http_status_code"] == status, err


def _assert_tgi_stream_cut(call: Call) -> dict:
    events = call.events()
    last = json.loads(events[-1])
    assert last["error_type"] == "unhealthy" and last["error"], last
    return last


def test_sigterm_refuses_new_work_finishes_running_and_cuts_the_rest_cleanly():
    timeout_s = 20  # long enough for the short request on a loaded 2-core machine (1.5 s a token seen)
    srv = Server(env={"GRACEFUL_TERMINATION_TIMEOUT": str(timeout_s), "MAX_CONCURRENT_REQUESTS": "8"})
    try:
        plain = Call(srv.url, "/generate", _long_tgi())
        chat = Call(srv.url, "/v1/chat/completions", _long_chat(True))
        native = Call(srv.url, "/generate_stream", _long_tgi())
        for call in (chat, native):
            assert call.first_byte.wait(60), srv.log()
        short = Call(srv.url, "/v1/chat/completions", chat_body("Say hi.", max_tokens=2, stream=True))
        assert short.first_byte.wait(60), srv.log()

        srv.proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()
        time.sleep(0.2)  # the worker's handler runs
        ping = requests.get(srv.url + "/ping", timeout=5)
        assert ping.status_code == 503 and ping.json()["error"] == "unhealthy", ping.text
        new = requests.post(srv.url + "/v1/chat/completions", json=chat_body("Hi"), timeout=5)
        assert new.status_code == 503, new.text
        assert new.json()["error"]["code"] == 503 and "shutting down" in new.json()["error"]["message"]

        rc = srv.proc.wait(timeout_s + 30)
        elapsed = time.monotonic() - t_signal
        for call in (plain, chat, native, short):
            call.join(10)
        # The short stream ran to its end; the long ones were cut at the deadline, with their terminator.
        events = short.events()
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length", \
            (len(events), events[-3:])
        _assert_openai_stream_cut(chat, 503)
        _assert_tgi_stream_cut(native)
        assert plain.status == 503 and json.loads(plain.raw)["error_type"] == "unhealthy", plain.raw
        assert rc == 0, srv.log()
        assert elapsed >= timeout_s, f"exited {elapsed:.1f}s after SIGTERM, before the requests' deadline"
    finally:
        srv.stop()


KILLER = textwrap.dedent('''
    import json

    import inference


    def model_fn(model_dir):
        return inference.sagellm_context()


    def input_fn(input_data, content_type):
        return json.loads(input_data)


    def predict_fn(data, ctx):
        # The engine loop's next step raises: the loop dies, as on a bug or a broken device.
        def broken_step():
            raise RuntimeError("injected engine failure")
        ctx.engine.engine.step = broken_step
        return {"broken": True}


    def output_fn(prediction, accept):
        return json.dumps(prediction), "application/json"
''')


def test_engine_death_answers_503_and_stops_the_server(tmp_path, loaded_model):
    for f in Path(loaded_model.source.path).iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "inference.py").write_text(KILLER)
    srv = Server(env={"SM_MODEL_DIR": str(tmp_path), "MAX_CONCURRENT_REQUESTS": "8"})
    try:
        plain = Call(srv.url, "/v1/chat/completions", _long_chat(False))
        chat = Call(srv.url, "/v1/chat/completions", _long_chat(True))
        native = Call(srv.url, "/generate_stream", _long_tgi())
        for call in (chat, native):
            assert call.first_byte.wait(60), srv.log()
        assert requests.post(srv.url + "/invocations", json={}, timeout=30).json() == {"broken": True}
        for call in (plain, chat, native):
            call.join(30)
        _assert_openai_stream_cut(chat, 503)
        assert "engine" in _assert_tgi_stream_cut(native)["error"]
        assert plain.status == 503, plain.raw
        assert json.loads(plain.raw)["error"]["code"] == 503
        rc = srv.proc.wait(30)
        assert rc != 0, srv.log()
    finally:
        srv.stop()
