"""The checks every request passes on its way in and out: the API key, the body, readiness,
admission (429), metrics and the request log, watching the client, and mapping errors to TGI's
or OpenAI's shape. Routes (the blueprints) only name the handler and its clients' error shape."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import Response, current_app, g, request

from sagellm.api import invocations
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import Flavor
from sagellm.api.responses import JsonResponse, RawResponse, StreamResponse
from sagellm.errors import GenerationError, Overloaded, SagellmError, Unauthorized, Unavailable
from sagellm.server.http import Admission, WatchedStream, error_response, json_body, raw_body, to_flask
from sagellm.server.metrics import Metrics, log_request
from sagellm.settings import Settings

log = logging.getLogger("sagellm")

Handler = Callable[[ServingContext, object], JsonResponse | StreamResponse | RawResponse]


@dataclass
class ServerState:
    """What the routes share, kept in app.extensions["sagellm"]."""

    settings: Settings
    runtime: object  # sagellm.server.runtime.Runtime (or a test's stand-in)
    admission: Admission
    metrics: Metrics


def state() -> ServerState:
    return current_app.extensions["sagellm"]


def generation(handler: Handler, flavor: Flavor | None, raw: bool = False) -> Response:
    """Run a generation handler behind every check. flavor None: /invocations, where the body's
    shape decides; raw: the body goes to the handler as bytes (custom input_fn)."""
    st = state()
    t0, path, request_id = time.monotonic(), request.path, g.request_id  # a stream outlives the request
    admitted = False
    try:
        _authorize(st.settings)
        body = raw_body(st.settings.payload_limit) if raw else json_body(st.settings.payload_limit)
        flavor = flavor or invocations.flavor_of(st.settings, body)
        if st.settings.log_prompts:
            log_request(id=request_id, route=path, body=body)
        _admit(st)
        admitted = True
        result = handler(_watched(st.runtime.ctx), body)
    except Exception as exc:
        if admitted:
            _release(st)
        return _refuse(st, exc, flavor or "tgi", path, t0, request_id)

    def done() -> None:
        _release(st)
        st.metrics.success.inc()
        st.metrics.duration.observe(time.monotonic() - t0)
        _log(path, 200, t0, request_id)

    return to_flask(result, done)


def informational(fn: Callable[[ServingContext], JsonResponse], flavor: Flavor = "tgi") -> Response:
    """A route that reads the model's state (/info, /tokenize, /v1/models): readiness only."""
    try:
        return to_flask(fn(_ready(state().runtime)), lambda: None)
    except SagellmError as exc:
        return error_response(exc, flavor)


def health() -> Response:
    """/ping (and TGI's /health): 200 with no body while the engine is healthy, else 503."""
    ok, why = state().runtime.healthy()
    if ok:
        return Response(status=200)
    body = {"error": "unhealthy", "error_type": "healthcheck", "detail": why}
    return to_flask(JsonResponse(body, status=503), lambda: None)


def _authorize(settings: Settings) -> None:
    if settings.api_key:
        auth = request.headers.get("Authorization", "")
        if auth.lower() != f"bearer {settings.api_key}".lower():
            raise Unauthorized("missing or wrong `Authorization: Bearer` API key")


def _ready(runtime) -> ServingContext:
    if runtime.state != "ready":
        raise Unavailable(f"the model is not ready ({runtime.state})")
    return runtime.ctx


def _admit(st: ServerState) -> None:
    """Readiness, then one of MAX_CONCURRENT_REQUESTS slots (429 at once, never a queue)."""
    _ready(st.runtime)
    if not st.admission.try_acquire():
        raise Overloaded(f"Model is overloaded: {st.admission.limit} requests in flight "
                         "(MAX_CONCURRENT_REQUESTS)")
    st.metrics.requests.inc()
    st.metrics.in_flight.inc()


def _release(st: ServerState) -> None:
    st.admission.release()
    st.metrics.in_flight.dec()


def _watched(ctx: ServingContext) -> ServingContext:
    """This request's context: a client that disconnects aborts its streams."""
    sock = request.environ.get("gunicorn.socket")
    return dataclasses.replace(ctx, watch=lambda stream: WatchedStream(stream, sock))


def _refuse(st: ServerState, exc: Exception, flavor: Flavor, path: str, t0: float, request_id: str) -> Response:
    if not isinstance(exc, SagellmError):  # our bug: log it, never send the traceback
        log.exception("unhandled error on %s", path)
        st.metrics.failure.labels(err="internal").inc()
        return error_response(GenerationError(f"internal error ({type(exc).__name__}); request id {request_id}"),
                              flavor)
    st.metrics.failure.labels(err=exc.error_type).inc()
    _log(path, exc.status, t0, request_id, error=exc.message)
    return error_response(exc, flavor)


def _log(path: str, status: int, t0: float, request_id: str, **extra) -> None:
    log_request(id=request_id, route=path, status=status, ms=round((time.monotonic() - t0) * 1000, 1), **extra)
