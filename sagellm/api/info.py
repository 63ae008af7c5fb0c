"""/info: the server's limits and model, in TGI's shape plus a few extra fields."""

from __future__ import annotations

from sagellm import __version__
from sagellm.api.context import ServingContext


def info(ctx: ServingContext) -> dict:
    s = ctx.settings
    return {
        "model_id": ctx.engine.model.model_id,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "model_dtype": ctx.engine.model.dtype,
        "model_device_type": ctx.engine.model.device,
        "served_model_name": ctx.engine.model.served_name,
        "max_concurrent_requests": s.max_concurrent_requests,
        "max_best_of": s.max_best_of,
        "max_stop_sequences": s.max_stop_sequences,
        "max_input_tokens": ctx.engine.limits.max_input_tokens,
        "max_total_tokens": ctx.engine.limits.max_total_tokens,
        "max_batch_prefill_tokens": ctx.engine.limits.max_batch_prefill_tokens,
        "max_batch_total_tokens": ctx.engine.limits.max_batch_total_tokens,
        "max_batch_size": ctx.engine.limits.max_batch_size,
        "max_top_n_tokens": s.max_top_n_tokens,
        "max_client_batch_size": s.max_client_batch_size,
        "max_choices": s.max_choices,
        "grammar_support": not s.disable_grammar_support,
        "validation_workers": 1,
        "router": "sagellm",
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }
