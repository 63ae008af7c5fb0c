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

from pydantic import BaseModel

from sagellm.api import chat, tgi
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import invalid
from sagellm.api.info import info
from sagellm.api.protocol_tgi import TokenizedToken
from sagellm.api.responses import JsonResponse

ACTIONS = ("info", "tokenize", "apply_chat_template")


class Tokens(BaseModel):
    tokens: list[TokenizedToken]
    count: int


class RenderedChat(BaseModel):
    prompt: str  # the conversation through the chat template
    prompt_tokens: int
    token_ids: list[int]
    max_new_tokens: int  # what the request may generate (its own limit, or the rest of the context)
    max_input_tokens: int
    max_total_tokens: int


def introspect(ctx: ServingContext, body: dict) -> JsonResponse:
    action = body.get("action")
    if action == "info":
        return JsonResponse(info(ctx).model_copy(update={"invocations_actions": list(ACTIONS)}))
    if action == "tokenize" and "messages" not in body:
        tokens = tgi.tokenize(ctx, body).body
        return JsonResponse(Tokens(tokens=tokens, count=len(tokens)))
    if action in ("tokenize", "apply_chat_template"):
        job = chat.prepare_chat(ctx, {k: v for k, v in body.items() if k != "action"})
        lim = ctx.engine.limits
        return JsonResponse(RenderedChat(prompt=job.prompt, prompt_tokens=len(job.ids), token_ids=job.ids,
                                         max_new_tokens=job.params.max_new_tokens,
                                         max_input_tokens=lim.max_input_tokens, max_total_tokens=lim.max_total_tokens))
    raise invalid(f"`action` must be one of {list(ACTIONS)}. Given: {action!r}", "action")
