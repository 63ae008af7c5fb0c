"""The checks every request passes on its way in and out: the API key, the body, readiness,
admission (429), metrics and the request log, watching the client, and mapping errors to TGI's
or OpenAI's shape. Routes (the blueprints) only name the handler and its clients' error shape."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import Response, current_app, g, request

from sagellm.api import adapters, invocations
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import Flavor, flavor_of_path
from sagellm.api.responses import JsonResponse, RawResponse, StreamResponse
from sagellm.errors import GenerationError, Overloaded, SagellmError, Unauthorized, Unavailable
from sagellm.server.drain import Drain
from sagellm.server.http import Admission, WatchedStream, error_response, json_body, raw_body, to_flask
from sagellm.server.metrics import Metrics, log_request
from sagellm.server.request_record import RequestRecord
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
    drain: Drain


def state() -> ServerState:
    return current_app.extensions["sagellm"]


def generation(handler: Handler, flavor: Flavor | None, raw: bool = False) -> Response:
    """Run a generation handler behind every check. flavor None: /invocations, where the body's
    shape decides; raw: the body goes to the handler as bytes (custom input_fn)."""
    st = state()
    # The record outlives the request context: a stream is written after the view returns.
    record = RequestRecord(st.metrics, request.path, g.request_id, time.monotonic())
    st.metrics.requests.inc()
    admitted = False
    try:
        body = raw_body(st.settings.payload_limit) if raw else json_body(st.settings.payload_limit)
        flavor = flavor or invocations.flavor_of(st.settings, body)
        if st.settings.log_prompts:
            log_request(id=record.request_id, route=record.route, body=body)
        _admit(st)
        admitted = record.admitted = True
        record.model_name = st.runtime.ctx.engine.model.served_name
        ctx = _watched(st, record)
        result = handler(ctx, body)
    except Exception as exc:
        if admitted:
            _release(st)
        return _refuse(exc, flavor or "tgi", record)

    def done(status: int, completed: bool) -> None:
        _release(st)
        record.adapter = ctx.notes.get("adapter")
        if record.adapter is not None:
            st.metrics.adapter_requests.labels(record.adapter).inc()
        record.close(status, completed)

    return to_flask(result, done)


def informational(fn: Callable[[ServingContext], JsonResponse], flavor: Flavor = "tgi") -> Response:
    """A route that reads the model's state (/info, /tokenize, /v1/models): readiness only."""
    try:
        return to_flask(fn(_ready(state().runtime)))
    except SagellmError as exc:
        return error_response(exc, flavor)
    except Exception as exc:  # our bug: log it, answer JSON without the traceback
        log.exception("unhandled error on %s", request.path)
        return error_response(SagellmError(f"internal error ({type(exc).__name__}); request id {g.request_id}"),
                              flavor)


def authorized(fn: Callable[[ServingContext], JsonResponse], flavor: Flavor) -> Response:
    """A route that reads or changes what requests stored (GET/DELETE /v1/responses/{id}): readiness
    (the API key was checked before the request), no body, no admission slot."""
    try:
        return to_flask(fn(_ready(state().runtime)))
    except SagellmError as exc:
        return error_response(exc, flavor)


def admin(fn: Callable[..., JsonResponse | RawResponse], flavor: Flavor = "tgi", *args, body: bool = True
          ) -> Response:
    """A route that changes what the server serves (LoRA adapters): readiness and the JSON body
    (the API key was checked before the request), then fn(ctx, body, *args) (fn(ctx, *args)
    without a body). Logged, not counted as a generation request."""
    st = state()
    t0, request_id = time.monotonic(), g.request_id
    try:
        ctx = _ready(st.runtime)
        given = (json_body(st.settings.payload_limit),) if body else ()
        result = fn(ctx, *given, *args)
    except Exception as exc:
        if not isinstance(exc, SagellmError):  # our bug: log it, never send the traceback
            log.exception("unhandled error on %s", request.path)
            exc = GenerationError(f"internal error ({type(exc).__name__}); request id {request_id}")
        _log_admin(request_id, exc.status, t0, error=type(exc).__name__, param=exc.param)
        return error_response(exc, flavor)
    _log_admin(request_id, result.status, t0)
    return to_flask(result)


def _log_admin(request_id: str, status: int, t0: float, **extra) -> None:
    log_request(id=request_id, route=request.path, status=status,
                ms=round((time.monotonic() - t0) * 1000, 1), **{k: v for k, v in extra.items() if v})


def health() -> Response:
    """/ping (and TGI's /health): 200 with no body while the engine is healthy, else 503."""
    ok, why = state().runtime.healthy()
    if ok:
        return Response(status=200)
    body = {"error": "unhealthy", "error_type": "healthcheck", "detail": why}
    return to_flask(JsonResponse(body, status=503))


# SageMaker's health check sends no key; every other route needs it when API_KEY is set.
OPEN_ENDPOINTS = frozenset({"sagemaker.ping", "tgi.health"})


def authorize() -> Response | None:
    """Before every request: with API_KEY set, `Authorization: Bearer <key>` (or, on Anthropic's
    routes, `x-api-key: <key>`, as its clients send it), or a 401 in the route's shape."""
    settings = state().settings
    if not settings.api_key or request.endpoint in OPEN_ENDPOINTS or request.endpoint is None:
        return None
    flavor = flavor_of_path(request.path)
    expected = settings.api_key.encode("utf-8")
    if flavor == "anthropic" and _same(request.headers.get("x-api-key", ""), expected):
        return None
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    # Only the scheme ignores case; the key is compared exactly, in constant time.
    if scheme.lower() == "bearer" and _same(given.strip(), expected):
        return None
    header = "`x-api-key` or `Authorization: Bearer`" if flavor == "anthropic" else "`Authorization: Bearer`"
    return error_response(Unauthorized(f"missing or wrong {header} API key"), flavor)


def _same(given: str, expected: bytes) -> bool:
    return hmac.compare_digest(given.encode("latin-1", "replace"), expected)


def _ready(runtime) -> ServingContext:
    if runtime.state != "ready":
        raise Unavailable(runtime.error or f"the model is not ready ({runtime.state})")
    return runtime.ctx


def _admit(st: ServerState) -> None:
    """Readiness, then one of MAX_CONCURRENT_REQUESTS slots (429 at once, never a queue)."""
    _ready(st.runtime)
    if not st.admission.try_acquire():
        raise Overloaded(f"Model is overloaded: {st.admission.limit} requests in flight "
                         "(MAX_CONCURRENT_REQUESTS)")
    st.metrics.in_flight.inc()


def _release(st: ServerState) -> None:
    st.admission.release()
    st.metrics.in_flight.dec()


def _watched(st: ServerState, record: RequestRecord) -> ServingContext:
    """This request's context: a client that disconnects aborts its streams, the end of the
    drain after SIGTERM cuts them, and their events feed the request's record; the adapter header."""
    sock = request.environ.get("gunicorn.socket")
    return dataclasses.replace(st.runtime.ctx,
                               watch=lambda stream: WatchedStream(stream, sock, st.drain.cut, record),
                               adapter_header=request.headers.get(adapters.HEADER), notes={})


def _refuse(exc: Exception, flavor: Flavor, record: RequestRecord) -> Response:
    if not isinstance(exc, SagellmError):  # our bug: log it, never send the traceback
        log.exception("unhandled error on %s", record.route)
        exc = GenerationError(f"internal error ({type(exc).__name__}); request id {record.request_id}")
        record.failed("internal")
    record.failed(exc.error_type)
    # The class and the field, never the message: it may quote the request (LOG_PROMPTS is for that).
    record.close(exc.status, error=type(exc).__name__, param=exc.param)
    return error_response(exc, flavor)
