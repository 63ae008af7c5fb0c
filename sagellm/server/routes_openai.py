"""The OpenAI routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from flask import Blueprint

from sagellm.api import chat, completions
from sagellm.api import info as info_api
from sagellm.server.checks import generation, informational

bp = Blueprint("openai", __name__)


@bp.post("/v1/chat/completions")
def chat_completions():
    return generation(chat.chat, "openai")


@bp.post("/v1/completions")
def text_completions():
    return generation(completions.completions, "openai")


@bp.get("/v1/models")
def models():
    return informational(info_api.models, "openai")
