"""TGI's native routes: /generate, /generate_stream, POST / (compat: a one-element list),
/tokenize, /info, /health (and GET /), /metrics."""

from __future__ import annotations

from flask import Blueprint, Response

from sagellm.api import info as info_api
from sagellm.api import invocations as inv
from sagellm.api import tgi
from sagellm.api.responses import JsonResponse
from sagellm.server.checks import generation, health, informational, state
from sagellm.server.http import json_body

bp = Blueprint("tgi", __name__)
bp.add_url_rule("/health", "health", health, methods=["GET"])
bp.add_url_rule("/", "root_health", health, methods=["GET"])


@bp.post("/generate")
def generate():
    return generation(lambda ctx, body: tgi.generate(ctx, body, full_text_default=False), "tgi")


@bp.post("/generate_stream")
def generate_stream():
    return generation(lambda ctx, body: tgi.generate_stream(ctx, body, full_text_default=False), "tgi")


@bp.post("/")
def compat():
    return generation(inv.native, "tgi")


@bp.post("/tokenize")
def tokenize():
    return informational(lambda ctx: tgi.tokenize(ctx, json_body(state().settings.payload_limit)))


@bp.get("/info")
def info():
    return informational(lambda ctx: JsonResponse(info_api.info(ctx)))


@bp.get("/metrics")
def metrics():
    engine = state().runtime.engine
    body = state().metrics.render(engine.stats() if engine is not None else None)
    return Response(body, mimetype="text/plain; version=0.0.4")
