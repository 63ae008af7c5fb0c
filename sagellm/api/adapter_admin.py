"""Registering and removing LoRA adapters at run time: SageMaker's adapter contract
(POST /adapters {"name", "src"}, DELETE /adapters/{name}, GET /adapters) and vLLM's routes
(POST /v1/load_lora_adapter {"lora_name", "lora_path"}, POST /v1/unload_lora_adapter {"lora_name"}).
Removing waits for the requests running on the adapter; new ones naming it get 404 at once."""

from __future__ import annotations

from sagellm.api.context import ServingContext
from sagellm.api.responses import JsonResponse, RawResponse
from sagellm.errors import BadRequest, ValidationError


def _field(body, key: str) -> str:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"`{key}` must be a non-empty string", param=key)
    return value.strip()


def listing(ctx: ServingContext) -> JsonResponse:
    return JsonResponse({"adapters": [{"name": n} for n in ctx.engine.adapter_names()]})


def register(ctx: ServingContext, body) -> JsonResponse:
    name, src = _field(body, "name"), _field(body, "src")
    ctx.engine.load_adapter(name, src)
    return JsonResponse({"name": name, "src": src, "status": "registered"})


def unregister(ctx: ServingContext, name: str) -> JsonResponse:
    ctx.engine.unload_adapter(name)
    return JsonResponse({"name": name, "status": "unregistered"})


def vllm_load(ctx: ServingContext, body) -> RawResponse:
    name, path = _field(body, "lora_name"), _field(body, "lora_path")
    ctx.engine.load_adapter(name, path)
    return RawResponse(f"Success: LoRA adapter '{name}' added successfully.", "text/plain")


def vllm_unload(ctx: ServingContext, body) -> RawResponse:
    name = _field(body, "lora_name")
    ctx.engine.unload_adapter(name)
    return RawResponse(f"Success: LoRA adapter '{name}' removed successfully.", "text/plain")
