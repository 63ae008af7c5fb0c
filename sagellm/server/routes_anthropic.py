"""Anthropic's routes: /v1/messages and /v1/messages/count_tokens (errors in Anthropic's shape;
x-api-key accepted as the key)."""

from __future__ import annotations

from flask import Blueprint

from sagellm.api import messages
from sagellm.server.checks import generation

bp = Blueprint("anthropic", __name__)


@bp.post("/v1/messages")
def create_message():
    return generation(messages.create, "anthropic")


@bp.post("/v1/messages/count_tokens")
def count_tokens():
    return generation(messages.count_tokens, "anthropic")
