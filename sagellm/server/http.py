"""Request bodies in, responses out: JSON parsing rules, the two error shapes, admission control
and noticing clients that went away."""

from __future__ import annotations

import json
import select
import socket
import threading

from flask import Response, request

from sagellm.api.error_shapes import Flavor, error_body
from sagellm.api.responses import JsonResponse, RawResponse, StreamResponse, json_text
from sagellm.engine.client import RequestStream
from sagellm.errors import BadRequest, PayloadTooLarge, SagellmError, UnsupportedMediaType

_JSON_LIKE = ("application/json", "text/plain", "application/octet-stream", "")


def json_body(limit: int):
    """The request's JSON, accepting a charset parameter, a missing Content-Type, text/plain or
    octet-stream when the body parses (SageMaker clients send all of these)."""
    raw = raw_body(limit)
    mime = (request.mimetype or "").lower()
    jsonish = mime in _JSON_LIKE or mime.endswith("+json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        if not jsonish:
            raise UnsupportedMediaType(f"Expected request with `Content-Type: application/json`, got {mime!r}")
        raise BadRequest(f"Failed to parse the request body as JSON: {exc}") from None


def error_response(exc: SagellmError, flavor: Flavor) -> Response:
    resp = Response(json_text(error_body(exc, flavor)), status=exc.status, mimetype="application/json")
    if exc.status == 429:
        resp.headers["Retry-After"] = "1"
    return resp


class Admission:
    """At most `limit` generation requests in flight; the rest get 429 at once, not a queue."""

    def __init__(self, limit: int):
        self._sem = threading.BoundedSemaphore(limit)
        self.limit = limit

    def try_acquire(self) -> bool:
        return self._sem.acquire(blocking=False)

    def release(self) -> None:
        self._sem.release()


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
    nothing is being written (queued, or a non-streaming request)."""

    def __init__(self, stream: RequestStream, sock):
        self._handle = stream
        self._sock = sock
        self.request_id, self.prompt_len, self.seed = stream.request_id, stream.prompt_len, stream.seed

    def iter_events(self, idle_s: float | None = None):
        idle = 0.0
        for n, event in enumerate(self._handle.iter_events(idle_s=0.5)):
            if (event is None or n % 16 == 0) and client_gone(self._sock):
                self._handle.abort()
            if event is not None:
                idle = 0.0
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
        raise PayloadTooLarge(f"request body of {length} bytes exceeds PAYLOAD_LIMIT={limit} bytes")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body exceeds PAYLOAD_LIMIT={limit} bytes")
    return raw


def to_flask(result: JsonResponse | RawResponse | StreamResponse, on_close) -> Response:
    if isinstance(result, RawResponse):
        on_close()
        return Response(result.body, status=result.status, content_type=result.content_type)
    if isinstance(result, JsonResponse):
        on_close()
        if result.body is None:
            return Response(status=result.status, headers=result.headers)
        return Response(json_text(result.body), status=result.status, mimetype="application/json",
                        headers=result.headers)

    def chunks():
        try:
            yield from result.chunks
        finally:
            on_close()

    return Response(chunks(), status=200, mimetype="text/event-stream", headers=result.headers,
                    direct_passthrough=True)
