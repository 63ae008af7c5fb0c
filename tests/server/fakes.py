"""A fake engine, runtime and app for the HTTP tests (no model): the engine streams a scripted
reply token by token, and the helpers check the two error shapes and SSE framing."""

from __future__ import annotations

import json
import re
import threading


from sagellm.api.context import ServingContext
from sagellm.engine.client import EngineClient, EngineStats, Health, Limits, ModelInfo, RequestStream, TokenSpan
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.settings import Settings

REPLY = ["Hello", " world", "!"]
VOCAB = {100 + i: t for i, t in enumerate(REPLY)}
CHAT = [{"role": "user", "content": "Say hello"}]
NATIVE = {"inputs": "a b c", "parameters": {"max_new_tokens": 5}}


class FakeHandle(RequestStream):
    def __init__(self, engine: "FakeEngine", ids, params):
        self.engine = engine
        self.request_id = f"req-{len(engine.handles)}"
        self.prompt_len = len(ids)
        self.seed = None
        self.ids, self.params = ids, params
        self.aborted = 0

    def iter_events(self, idle_s=None):
        eng = self.engine
        if eng.gate is not None:
            eng.waiting.set()
            assert eng.gate.wait(10), "the test never opened the gate"
        for i, (tid, text) in enumerate(VOCAB.items()):
            last = i == len(VOCAB) - 1
            if eng.fail_at == i:
                if eng.fail_mode == "raise":
                    raise RuntimeError("engine exploded: SECRET-INTERNAL-DETAIL")
                yield TokenEvent(i, -1, "", 0.0, True, "", [], FinishReason.ERROR, None, "CUDA out of memory")
                return
            yield TokenEvent(index=i, token_id=tid, text=text, logprob=-0.5, special=False, delta=text,
                             finish_reason=FinishReason.LENGTH if last else None)

    def abort(self):
        self.aborted += 1
        self.engine.aborts.append(self.request_id)


class FakeEngine:
    def __init__(self):
        self.handles: list[FakeHandle] = []
        self.aborts: list[str] = []
        self.gate: threading.Event | None = None  # when set, iter_events blocks until it opens
        self.waiting = threading.Event()
        self.fail_at: int | None = None
        self.fail_mode = "event"
        self.submit_error: Exception | None = None

    def submit(self, ids, params):
        if self.submit_error is not None:
            raise self.submit_error
        h = FakeHandle(self, ids, params)
        self.handles.append(h)
        return h


def tokenize(text: str, add_special: bool = True) -> list[int]:
    return [len(w) for w in text.split()]


class FakeClient(EngineClient):
    """The EngineClient over a scripted engine (anything with `submit(ids, params)`); words
    are tokens, a token's id its length."""

    model = ModelInfo(model_id="fake/model", served_name="fake-model", device="cpu", dtype="float32",
                      vocab_size=1000)
    limits = Limits(max_input_tokens=100, max_total_tokens=200, max_batch_prefill_tokens=100,
                    max_batch_total_tokens=1000, max_batch_size=4)

    def __init__(self, engine, compile_grammar=None):
        self.fake, self._compile = engine, compile_grammar

    def submit(self, prompt_ids, params, request_id=None):
        return self.fake.submit(prompt_ids, params)

    def abort(self, request_id):
        pass

    def health(self):
        return Health(True, True)

    def stats(self):
        return EngineStats(0, 0, 0)

    def shutdown(self):
        pass

    def tokenize(self, text, add_special_tokens=True, last=None):
        return tokenize(text)[-last:] if last else tokenize(text)

    def tokens_over(self, text, limit):
        return None  # words are tokens: no bound from the length alone

    def tokenize_with_offsets(self, text, last=None):
        spans = [TokenSpan(len(m.group()), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        return spans[-last:] if last else spans

    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(VOCAB.get(i, "") for i in token_ids)

    template_shows_tools = False

    def render_chat(self, messages, **kw):
        return " ".join(m["content"] for m in messages)

    def encode_chat(self, prompt):
        return tokenize(prompt)

    @property
    def supports_grammar(self):
        return self._compile is not None

    def compile_grammar(self, kind, value, param):
        return self._compile(kind, value, param)


def make_ctx(settings: Settings, engine, compile_grammar=None) -> ServingContext:
    return ServingContext.serving(settings, FakeClient(engine, compile_grammar))


class FakeRuntime:
    def __init__(self, settings: Settings):
        self.state = "ready"
        self.error = None
        self.engine = None
        self.fake = FakeEngine()
        self.ctx = make_ctx(settings, self.fake)
        self.health = (True, "ok")

    def healthy(self):
        return self.health


def _error_body(resp, status: int) -> dict:
    """An error answer's JSON body, after checking its status, type and that no traceback leaked."""
    text = resp.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text, text
    assert resp.status_code == status, f"{resp.status_code}: {text}"
    assert resp.mimetype == "application/json", resp.mimetype
    return json.loads(text)


def tgi_error(resp, status: int) -> str:
    body = _error_body(resp, status)
    assert isinstance(body.get("error"), str) and isinstance(body.get("error_type"), str), body
    return body["error"]


def oai_error(resp, status: int) -> dict:
    body = _error_body(resp, status)
    err = body.get("error")
    assert isinstance(err, dict), body
    assert isinstance(err.get("message"), str) and isinstance(err.get("type"), str), body
    assert "param" in err and err.get("code") == status, body
    return err


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into events, checking each is one `data:` line ended by a blank line."""
    assert raw.endswith(b"\n\n"), raw[-50:]
    parts = raw.split(b"\n\n")[:-1]
    out = []
    for p in parts:
        assert b"\n" not in p, f"an event spans several lines: {p!r}"
        if p == b":":
            continue  # keep-alive
        assert p.startswith(b"data:"), p
        out.append(p[len(b"data:"):].lstrip(b" "))
    return out
