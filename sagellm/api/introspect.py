"""Introspection through /invocations, the one route SageMaker users can reach: a body with
`"action"` returns the server's limits, token counts, or the prompt exactly as the model would
see it, instead of generating.

  {"action": "info"}                                  the /info document (limits, model, actions)
  {"action": "tokenize", "inputs": "text"}            tokens of a native prompt, with offsets
  {"action": "apply_chat_template", "messages": [...], "tools"?: [...], ...}
                                                      the rendered prompt, its token count and
                                                      the tokens left to generate
"""

from __future__ import annotations

from sagellm.api import chat, tgi
from sagellm.api.context import ServingContext
from sagellm.api.info import info
from sagellm.api.responses import JsonResponse
from sagellm.errors import ValidationError

ACTIONS = ("info", "tokenize", "apply_chat_template")


def introspect(ctx: ServingContext, body: dict) -> JsonResponse:
    action = body.get("action")
    if action == "info":
        return JsonResponse({**info(ctx), "invocations_actions": list(ACTIONS)})
    if action == "tokenize" and "messages" not in body:
        tokens = tgi.tokenize(ctx, body).body
        return JsonResponse({"tokens": tokens, "count": len(tokens)})
    if action in ("tokenize", "apply_chat_template"):
        job = chat.prepare_chat(ctx, {k: v for k, v in body.items() if k != "action"})
        return JsonResponse({
            "prompt": job.prompt, "prompt_tokens": len(job.ids), "token_ids": job.ids,
            "max_new_tokens": job.params.max_new_tokens, "max_input_tokens": ctx.engine.limits.max_input_tokens,
            "max_total_tokens": ctx.engine.limits.max_total_tokens})
    raise ValidationError(f"Input validation error: `action` must be one of {list(ACTIONS)}. Given: {action!r}",
                          param="action")
