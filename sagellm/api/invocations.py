"""SageMaker's /invocations: a table of request shapes, matched by the body's keys.

MESSAGES_API_ENABLED=true takes only Messages bodies, false only TGI native bodies; unset, the
first shape whose key is present wins (inputs -> native, messages -> chat, prompt -> completions).
A body with "action" asks for introspection instead (sagellm/api/introspect.py).
"""

from __future__ import annotations

from sagellm.api import chat, openai, tgi
from sagellm.api.context import ServingContext
from sagellm.api.introspect import introspect
from sagellm.api.responses import JsonResponse, StreamResponse
from sagellm.errors import BadRequest, ValidationError


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


SHAPES = (
    ("inputs", "TGI native", native),
    ("messages", "Messages (chat completions)", chat.chat),
    ("prompt", "completions", openai.completions),
)


def invocations(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    if "action" in body:  # introspection, whatever MESSAGES_API_ENABLED says
        return introspect(ctx, body)
    enabled = ctx.settings.messages_api_enabled
    if enabled is True:
        allowed = SHAPES[1:2]
    elif enabled is False:
        allowed = SHAPES[:1]
    else:
        allowed = SHAPES
    for key, _, handler in allowed:
        if key in body:
            return handler(ctx, body)
    wanted = " or ".join(f"`{key}` ({name})" for key, name, _ in allowed)
    why = ""
    if enabled is not None:
        why = f" (MESSAGES_API_ENABLED={'true' if enabled else 'false'})"
    raise ValidationError(f"Input validation error: the body must have {wanted}{why}", param=allowed[0][0])
