"""SageMaker's routes: GET/POST /ping, POST /invocations (the request shapes' table, or the
model's own code/inference.py handlers) and the adapter contract (/adapters)."""

from __future__ import annotations

from flask import Blueprint, request

from sagellm.api import adapter_admin
from sagellm.api import invocations as inv
from sagellm.server.checks import admin, generation, health, state

bp = Blueprint("sagemaker", __name__)
bp.add_url_rule("/ping", "ping", health, methods=["GET", "POST"])


@bp.post("/invocations")
def invocations():
    handlers = getattr(state().runtime, "handlers", None)
    if handlers is not None and handlers.active:  # the model's code/inference.py
        accept = request.headers.get("Accept", "application/json")
        return generation(lambda ctx, body: handlers.invoke(ctx, body, request.mimetype, accept), "tgi", raw=True)
    return generation(inv.invocations, None)


@bp.get("/adapters")
def adapters():
    return admin(adapter_admin.listing, body=False)


@bp.post("/adapters")
def register_adapter():
    return admin(adapter_admin.register)


@bp.delete("/adapters/<path:name>")
def unregister_adapter(name: str):
    return admin(adapter_admin.unregister, "tgi", name, body=False)
