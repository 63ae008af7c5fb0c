"""SageMaker's routes: GET/POST /ping and POST /invocations (the request shapes' table, or the
model's own code/inference.py handlers)."""

from __future__ import annotations

from flask import Blueprint, request

from sagellm.api import invocations as inv
from sagellm.server.checks import generation, health, state

bp = Blueprint("sagemaker", __name__)
bp.add_url_rule("/ping", "ping", health, methods=["GET", "POST"])


@bp.post("/invocations")
def invocations():
    handlers = getattr(state().runtime, "handlers", None)
    if handlers is not None and handlers.active:  # the model's code/inference.py
        accept = request.headers.get("Accept", "application/json")
        return generation(lambda ctx, body: handlers.invoke(ctx, body, request.mimetype, accept), "tgi", raw=True)
    return generation(inv.invocations, None)
