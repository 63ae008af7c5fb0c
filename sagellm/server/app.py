"""The Flask app factory and every route. Handlers live in sagellm.api; this file only moves
bytes: parse the body, check readiness, admission and auth, send JSON or SSE, map errors."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import uuid

from flask import Flask, Response, g, request

from sagellm.api import info as info_api
from sagellm.api import invocations as inv
from sagellm.api import chat, completions, tgi
from sagellm.errors import (GenerationError, NotFound, Overloaded, SagellmError, Unauthorized,
                            Unavailable)
from sagellm.api.responses import JsonResponse
from sagellm.server.http import Admission, WatchedStream, error_response, json_body, raw_body, to_flask
from sagellm.server.metrics import Metrics, log_request
from sagellm.server.runtime import Runtime
from sagellm.settings import Settings

log = logging.getLogger("sagellm")


def _flavor_of(path: str, body, settings: Settings) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path == "/invocations":
        if settings.messages_api_enabled is not None:
            return "openai" if settings.messages_api_enabled else "tgi"
        if isinstance(body, dict) and "inputs" not in body and ("messages" in body or "prompt" in body):
            return "openai"
    return "tgi"


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Flask:
    settings = settings or Settings.from_env()
    # The engine thread re-takes the GIL after every torch op; with dozens of HTTP threads
    # streaming, a shorter switch interval keeps its steps short (measured: +8-15% tok/s at c=16).
    sys.setswitchinterval(0.0005)
    if runtime is None:
        runtime = Runtime(settings)
        runtime.start_background()
    app = Flask("sagellm")
    app.config["SAGELLM_RUNTIME"] = runtime
    admission = Admission(settings.max_concurrent_requests)
    metrics = Metrics()

    def generation(handler, flavor_hint: str | None = None, raw: bool = False):
        """Run a generation handler with auth, readiness, admission and error mapping."""
        t0 = time.monotonic()
        path, request_id = request.path, g.request_id  # a stream outlives the request context
        body = None
        flavor = flavor_hint or "tgi"
        acquired = False
        try:
            if settings.api_key:
                auth = request.headers.get("Authorization", "")
                if auth.lower() != f"bearer {settings.api_key}".lower():
                    raise Unauthorized("missing or wrong `Authorization: Bearer` API key")
            body = raw_body(settings.payload_limit) if raw else json_body(settings.payload_limit)
            flavor = flavor_hint or _flavor_of(request.path, body, settings)
            if settings.log_prompts:
                log_request(id=request_id, route=path, body=body)
            if runtime.state != "ready":
                raise Unavailable(f"the model is not ready ({runtime.state})")
            if not admission.try_acquire():
                raise Overloaded(f"Model is overloaded: {admission.limit} requests in flight "
                                 "(MAX_CONCURRENT_REQUESTS)")
            acquired = True
            metrics.requests.inc()
            metrics.in_flight.inc()
            sock = request.environ.get("gunicorn.socket")
            watched = dataclasses.replace(runtime.ctx, watch=lambda stream: WatchedStream(stream, sock))
            result = handler(watched, body)
        except SagellmError as exc:
            if acquired:
                admission.release()
                metrics.in_flight.dec()
            metrics.failure.labels(err=exc.error_type).inc()
            _log(path, exc.status, t0, request_id, error=exc.message)
            return error_response(exc, flavor)
        except Exception as exc:  # our bug: log it, never send the traceback
            if acquired:
                admission.release()
                metrics.in_flight.dec()
            log.exception("unhandled error on %s", request.path)
            metrics.failure.labels(err="internal").inc()
            return error_response(GenerationError(f"internal error ({type(exc).__name__}); "
                                                  f"request id {request_id}"), flavor)

        def done():
            admission.release()
            metrics.in_flight.dec()
            metrics.success.inc()
            metrics.duration.observe(time.monotonic() - t0)
            _log(path, 200, t0, request_id)

        return to_flask(result, done)

    def _log(path, status, t0, request_id, **extra):
        log_request(id=request_id, route=path, status=status,
                    ms=round((time.monotonic() - t0) * 1000, 1), **extra)

    @app.before_request
    def _request_id():
        g.request_id = request.headers.get("X-Amzn-RequestId") or uuid.uuid4().hex

    @app.after_request
    def _stamp(resp):
        resp.headers["x-request-id"] = g.get("request_id", "")
        return resp

    # ---- health ----

    def health():
        ok, why = runtime.healthy()
        if ok:
            return Response(status=200)
        return Response('{"error":"unhealthy","error_type":"healthcheck","detail":%s}' % _json_str(why),
                        status=503, mimetype="application/json")

    app.add_url_rule("/ping", "ping", health, methods=["GET", "POST"])
    app.add_url_rule("/health", "health", health, methods=["GET"])
    app.add_url_rule("/", "root_health", health, methods=["GET"])

    # ---- generation ----

    def invocations():
        handlers = getattr(runtime, "handlers", None)
        if handlers is not None and handlers.active:  # the model's code/inference.py
            return generation(lambda c, body: handlers.invoke(c, body, request.mimetype, request.headers.get(
                "Accept", "application/json")), "tgi", raw=True)
        return generation(inv.invocations)

    app.add_url_rule("/invocations", "invocations", invocations, methods=["POST"])
    app.add_url_rule("/", "compat", lambda: generation(inv.native, "tgi"), methods=["POST"])
    app.add_url_rule("/generate", "generate",
                     lambda: generation(lambda c, b: tgi.generate(c, b, full_text_default=False), "tgi"),
                     methods=["POST"])
    app.add_url_rule("/generate_stream", "generate_stream",
                     lambda: generation(lambda c, b: tgi.generate_stream(c, b, full_text_default=False), "tgi"),
                     methods=["POST"])
    app.add_url_rule("/v1/chat/completions", "chat", lambda: generation(chat.chat, "openai"), methods=["POST"])
    app.add_url_rule("/v1/completions", "completions", lambda: generation(completions.completions, "openai"),
                     methods=["POST"])

    # ---- information ----

    def ready_ctx():
        if runtime.state != "ready":
            raise Unavailable(f"the model is not ready ({runtime.state})")
        return runtime.ctx

    def informational(fn, flavor="tgi"):
        try:
            return to_flask(fn(ready_ctx()), lambda: None)
        except SagellmError as exc:
            return error_response(exc, flavor)

    app.add_url_rule("/info", "info", lambda: informational(lambda c: JsonResponse(info_api.info(c))))
    app.add_url_rule("/v1/models", "models", lambda: informational(info_api.models, "openai"))
    app.add_url_rule("/tokenize", "tokenize",
                     lambda: informational(lambda c: tgi.tokenize(c, json_body(settings.payload_limit))),
                     methods=["POST"])

    @app.route("/metrics")
    def _metrics():
        stats = runtime.engine.stats() if runtime.engine is not None else None
        return Response(metrics.render(stats), mimetype="text/plain; version=0.0.4")

    @app.errorhandler(404)
    def _not_found(_):
        return error_response(NotFound(f"no route {request.method} {request.path}"), "tgi")

    @app.errorhandler(405)
    def _bad_method(_):
        exc = NotFound(f"method {request.method} is not allowed on {request.path}")
        exc.status = 405
        return error_response(exc, "tgi")

    return app


def _json_str(s: str) -> str:
    import json
    return json.dumps(s)
