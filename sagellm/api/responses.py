"""What handlers return: a JSON document or an SSE byte stream; the server layer sends them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pydantic import BaseModel

from sagellm.engine.client import RequestStream


@dataclass
class JsonResponse:
    body: Any  # a response model, a list of them (TGI's compat route), plain JSON, or None (no body)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    def content(self) -> Any:
        """The body as plain JSON values (what a custom predict_fn receives)."""
        return jsonable(self.body)


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


def jsonable(body: Any) -> Any:
    if isinstance(body, BaseModel):
        return body.model_dump(mode="json")
    if isinstance(body, list):
        return [jsonable(item) for item in body]
    if isinstance(body, dict):
        return {key: jsonable(value) for key, value in body.items()}
    return body


def json_text(body: Any) -> str:
    """Compact JSON, non-ASCII kept as it is."""
    if isinstance(body, BaseModel):
        return body.model_dump_json()
    return json.dumps(jsonable(body), separators=(",", ":"), ensure_ascii=False)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE_S = 15.0


def sse(obj: Any) -> bytes:
    """One event: `data: <compact json>\\n\\n` (the space after the colon suits every client)."""
    return b"data: " + json_text(obj).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b":\n\n"


def event_stream(stream: RequestStream, render: Callable[[Any], list[bytes]],
                 idle_s: float = KEEPALIVE_S) -> Iterator[bytes]:
    """Drive `stream`, turning each engine event into SSE bytes via `render` (None = idle tick).
    Closing the generator (the client went away) aborts the request."""
    finished = False
    try:
        for event in stream.iter_events(idle_s):
            if event is None:
                yield SSE_KEEPALIVE
                continue
            yield from render(event)
            if event.finish_reason is not None:
                finished = True
    finally:
        if not finished:
            stream.abort()
