"""What the server serves: /info (TGI's shape plus a few fields) and /v1/models."""

from __future__ import annotations

from sagellm import __version__
from sagellm.api.context import ServingContext
from sagellm.api.protocol_openai import ModelCard, ModelList
from sagellm.api.protocol_tgi import Info
from sagellm.api.responses import JsonResponse


def info(ctx: ServingContext) -> Info:
    s, model, lim = ctx.settings, ctx.engine.model, ctx.engine.limits
    return Info(
        model_id=model.model_id, model_dtype=model.dtype, model_device_type=model.device,
        served_model_name=model.served_name, max_concurrent_requests=s.max_concurrent_requests,
        max_best_of=s.max_best_of, max_stop_sequences=s.max_stop_sequences,
        max_input_tokens=lim.max_input_tokens, max_total_tokens=lim.max_total_tokens,
        max_batch_prefill_tokens=lim.max_batch_prefill_tokens, max_batch_total_tokens=lim.max_batch_total_tokens,
        max_batch_size=lim.max_batch_size, max_top_n_tokens=s.max_top_n_tokens,
        max_client_batch_size=s.max_client_batch_size, max_choices=s.max_choices,
        grammar_support=ctx.engine.supports_grammar, version=__version__)


def models(ctx: ServingContext) -> JsonResponse:
    return JsonResponse(ModelList(data=[ModelCard(id=ctx.engine.model.served_name,
                                                  max_model_len=ctx.engine.limits.max_total_tokens)]))
