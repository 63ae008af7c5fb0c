"""The OpenAI routes: /v1/chat/completions, /v1/completions, /v1/models, /v1/responses (and a
stored response by id), and vLLM's LoRA adapter routes."""

from __future__ import annotations

from flask import Blueprint

from sagellm.api import adapter_admin, chat, completions, oai_responses
from sagellm.api import info as info_api
from sagellm.server.checks import admin, authorized, generation, informational

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


@bp.post("/v1/responses")
def responses_create():
    return generation(oai_responses.create, "openai")


@bp.get("/v1/responses/<response_id>")
def responses_get(response_id: str):
    return authorized(lambda ctx: oai_responses.retrieve(ctx, response_id), "openai")


@bp.delete("/v1/responses/<response_id>")
def responses_delete(response_id: str):
    return authorized(lambda ctx: oai_responses.delete(ctx, response_id), "openai")


@bp.post("/v1/load_lora_adapter")
def load_lora_adapter():
    return admin(adapter_admin.vllm_load, "openai")


@bp.post("/v1/unload_lora_adapter")
def unload_lora_adapter():
    return admin(adapter_admin.vllm_unload, "openai")
