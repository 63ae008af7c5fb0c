"""What handlers return: a JSON document or an SSE byte stream; the server layer sends them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass
class JsonResponse:
    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RawResponse:
    """Bytes or text as a custom output_fn made them."""

    body: bytes | str
    content_type: str = "application/json"
    status: int = 200


@dataclass
class StreamResponse:
    chunks: Iterator[bytes]  # each one complete SSE event (or keep-alive comment)
    headers: dict[str, str] = field(default_factory=dict)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE_S = 15.0


def sse(obj: Any) -> bytes:
    """One event: `data: <compact json>\\n\\n` (the space after the colon suits every client)."""
    import json

    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b":\n\n"


def event_stream(handle, render: Callable[[Any], list[bytes]], idle_s: float = KEEPALIVE_S) -> Iterator[bytes]:
    """Drive `handle`, turning each engine event into SSE bytes via `render` (None = idle tick).
    Closing the generator (the client went away) aborts the request."""
    finished = False
    try:
        for event in handle.iter_events(idle_s):
            if event is None:
                yield SSE_KEEPALIVE
                continue
            yield from render(event)
            if event.finish_reason is not None:
                finished = True
    finally:
        if not finished:
            handle.abort()
