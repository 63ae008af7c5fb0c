"""Request bodies in, responses out: JSON parsing rules, the two error shapes, admission control
and noticing clients that went away."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Callable

from flask import Response, request

from sagellm.api.error_shapes import Flavor, error_body
from sagellm.api.responses import JsonResponse, RawResponse, StreamResponse, json_text
from sagellm.engine.client import RequestStream
from sagellm.errors import BadRequest, PayloadTooLarge, SagellmError, Unavailable, UnsupportedMediaType
from sagellm.server.request_record import RequestRecord

# serde_json's limit, which TGI's clients already live with.
MAX_JSON_DEPTH = 128
# A body over PAYLOAD_LIMIT is read (and dropped) up to this size before the 413 goes out:
# closing a connection with unread bytes resets it, and the client sees a broken pipe instead.
DRAIN_LIMIT = 64 * 1024 * 1024
_JSON_LIKE = ("application/json", "text/plain", "application/octet-stream", "")


def json_body(limit: int):
    """The request's JSON, accepting a charset parameter, a missing Content-Type, text/plain or
    octet-stream when the body parses (SageMaker clients send all of these)."""
    raw = raw_body(limit)
    mime = (request.mimetype or "").lower()
    jsonish = mime in _JSON_LIKE or mime.endswith("+json")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"Failed to parse the request body as JSON: nested more than {MAX_JSON_DEPTH} "
                         "levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if not jsonish:
            raise UnsupportedMediaType(f"Expected request with `Content-Type: application/json`, got {mime!r}")
        raise BadRequest(f"Failed to parse the request body as JSON: {exc}") from None
    check_json(body)
    return body


def check_json(body) -> None:
    """JSON that parses but no handler can take: nested deeper than MAX_JSON_DEPTH (recursion in
    pydantic, templates and grammar compilers), or a string with a lone UTF-16 surrogate
    ("\\ud800", which no tokenizer can encode)."""
    stack = [(body, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    where = f" in `{path}`" if path else ""
                    raise BadRequest(f"Failed to parse the request body as JSON: a lone surrogate{where} "
                                     "(a \\ud800-\\udfff escape without its pair) is not text") from None
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"Failed to parse the request body as JSON: nested more than {MAX_JSON_DEPTH} "
                             "levels deep")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            stack.append((key, depth, path))  # keys are strings too
            stack.append((item, depth + 1, f"{path}.{key}" if path else str(key)))


def error_response(exc: SagellmError, flavor: Flavor) -> Response:
    resp = Response(json_text(error_body(exc, flavor)), status=exc.status, mimetype="application/json")
    if exc.status == 429:
        resp.headers["Retry-After"] = "1"
    return resp


class Admission:
    """At most `limit` generation requests in flight; the rest get 429 at once, not a queue."""

    def __init__(self, limit: int):
        self.limit = limit
        self._n = 0
        self._changed = threading.Condition()

    def try_acquire(self) -> bool:
        with self._changed:
            if self._n >= self.limit:
                return False
            self._n += 1
            return True

    def release(self) -> None:
        with self._changed:
            self._n -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False when `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._n == 0, timeout)


def client_gone(sock: socket.socket | None) -> bool:
    """True when the peer closed the connection (readable with nothing to read)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class WatchedStream(RequestStream):
    """A request's stream that aborts the request when the HTTP client disconnects, even while
    nothing is being written (queued, or a non-streaming request); ends it with a 503 when the
    server stops (`cut`, set at GRACEFUL_TERMINATION_TIMEOUT after SIGTERM); and reports every
    event to the request's record (metrics, the log line)."""

    def __init__(self, stream: RequestStream, sock, cut: threading.Event, record: RequestRecord):
        self._handle = stream
        self._sock = sock
        self._cut = cut
        self._record = record
        self.request_id, self.prompt_len, self.seed = stream.request_id, stream.prompt_len, stream.seed
        record.submitted(stream.prompt_len)

    def iter_events(self, idle_s: float | None = None):
        try:
            yield from self._events(idle_s)
        except SagellmError as exc:
            self._record.failed(exc.error_type)
            raise
        except Exception:
            self._record.failed("generation")
            raise

    def _events(self, idle_s: float | None):
        idle = 0.0
        key = id(self)
        for n, event in enumerate(self._handle.iter_events(idle_s=0.5)):
            if self._cut.is_set():
                self._handle.abort()
                raise Unavailable("the server is shutting down: GRACEFUL_TERMINATION_TIMEOUT passed "
                                  "before this request finished")
            if (event is None or n % 16 == 0) and client_gone(self._sock):
                self._record.client_gone = True
                self._handle.abort()
            if event is not None:
                idle = 0.0
                self._record.event(key, event)
                yield event
            elif idle_s is not None:
                idle += 0.5
                if idle >= idle_s:
                    idle = 0.0
                    yield None

    def abort(self) -> None:
        self._handle.abort()


def raw_body(limit: int) -> bytes:
    """The request body as bytes (custom input_fn decides what it means)."""
    length = request.content_length
    if length is not None and length > limit:
        _drain(length)
        raise PayloadTooLarge(f"request body of {length} bytes exceeds PAYLOAD_LIMIT={limit} bytes")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        _drain(DRAIN_LIMIT)
        raise PayloadTooLarge(f"request body exceeds PAYLOAD_LIMIT={limit} bytes")
    return raw


def _drain(length: int) -> None:
    """Read the rest of a refused body, when it is not absurdly large, so the answer arrives."""
    if length > DRAIN_LIMIT:
        return
    left = length
    while left > 0:
        chunk = request.stream.read(min(left, 1 << 20))
        if not chunk:
            return
        left -= len(chunk)


def to_flask(result: JsonResponse | RawResponse | StreamResponse,
             on_close: Callable[[int, bool], None] | None = None) -> Response:
    """The Flask response; on_close(status, completed) when it has gone out (completed: False when
    the client left in the middle of a stream)."""
    on_close = on_close or (lambda status, completed: None)
    if isinstance(result, RawResponse):
        on_close(result.status, True)
        return Response(result.body, status=result.status, content_type=result.content_type)
    if isinstance(result, JsonResponse):
        on_close(result.status, True)
        if result.body is None:
            return Response(status=result.status, headers=result.headers)
        return Response(json_text(result.body), status=result.status, mimetype="application/json",
                        headers=result.headers)

    def chunks():
        completed = False
        try:
            yield from result.chunks
            completed = True
        finally:
            on_close(200, completed)

    return Response(chunks(), status=200, mimetype="text/event-stream", headers=result.headers,
                    direct_passthrough=True)
