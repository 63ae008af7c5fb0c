"""SageMaker's /invocations: a table of request shapes, matched by the body's keys.

MESSAGES_API_ENABLED=true takes only Messages bodies, false only TGI native bodies; unset, the
first shape whose key is present wins (inputs -> native, messages -> chat, prompt -> completions).
A body with "action" asks for introspection instead (sagellm/api/introspect.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sagellm.api import chat, completions, tgi
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import Flavor, invalid
from sagellm.api.introspect import introspect
from sagellm.api.responses import JsonResponse, StreamResponse
from sagellm.errors import BadRequest
from sagellm.settings import Settings


def native(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    """POST / and native /invocations: TGI's compat route (a one-element list, full text by default)."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    default = ctx.settings.return_full_text
    if body.get("stream"):
        return tgi.generate_stream(ctx, body, full_text_default=default)
    resp = tgi.generate(ctx, body, full_text_default=default)
    resp.body = [resp.body]
    return resp


@dataclass(frozen=True)
class Shape:
    key: str  # the body key that selects it
    name: str
    handler: Callable[[ServingContext, dict], JsonResponse | StreamResponse]
    flavor: Flavor  # the error shape its clients read


INTROSPECTION = Shape("action", "introspection", introspect, "tgi")
SHAPES = (
    Shape("inputs", "TGI native", native, "tgi"),
    Shape("messages", "Messages (chat completions)", chat.chat, "openai"),
    Shape("prompt", "completions", completions.completions, "openai"),
)


def allowed_shapes(settings: Settings) -> tuple[Shape, ...]:
    if settings.messages_api_enabled is True:
        return SHAPES[1:2]
    if settings.messages_api_enabled is False:
        return SHAPES[:1]
    return SHAPES


def match(settings: Settings, body) -> Shape | None:
    """The shape `body` asks for (introspection whatever MESSAGES_API_ENABLED says), or None."""
    if not isinstance(body, dict):
        return None
    if INTROSPECTION.key in body:
        return INTROSPECTION
    return next((shape for shape in allowed_shapes(settings) if shape.key in body), None)


def invocations(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    shape = match(ctx.settings, body)
    if shape is not None:
        return shape.handler(ctx, body)
    allowed = allowed_shapes(ctx.settings)
    wanted = " or ".join(f"`{s.key}` ({s.name})" for s in allowed)
    enabled = ctx.settings.messages_api_enabled
    why = "" if enabled is None else f" (MESSAGES_API_ENABLED={'true' if enabled else 'false'})"
    raise invalid(f"the body must have {wanted}{why}", allowed[0].key)


def flavor_of(settings: Settings, body) -> Flavor:
    """The error shape this body's clients read: that of the shape it asks for (for
    introspection, the shape of the rest of the body), else that of the first shape allowed."""
    rest = {k: v for k, v in body.items() if k != INTROSPECTION.key} if isinstance(body, dict) else None
    shape = match(settings, rest)
    return (shape or allowed_shapes(settings)[0]).flavor
