"""Which LoRA adapter a request runs on: TGI's `parameters.adapter_id`, OpenAI's `model` field and
SageMaker's X-Amzn-SageMaker-Adapter-Identifier header (adapter inference components).

An adapter id or header naming no loaded adapter is a 404 naming it, never the base model's
answer. OpenAI's `model` is looser, as vLLM's: an adapter's name selects it, anything else
(the base model's name, an unknown name) serves the base model.
"""

from __future__ import annotations

from sagellm.api.context import ServingContext
from sagellm.errors import NotFound, ValidationError

HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


def _is_base(ctx: ServingContext, name: str) -> bool:
    model = ctx.engine.model
    return name in (model.served_name, model.model_id)


def _named(ctx: ServingContext, name: str, field: str) -> str | None:
    """`name` as an explicit adapter choice: None for the base model, else a loaded adapter."""
    if not name or _is_base(ctx, name):
        return None
    if name not in ctx.engine.adapter_names():
        raise NotFound(f"adapter `{name}` ({field}) is not loaded; loaded: "
                       f"{', '.join(ctx.engine.adapter_names()) or 'none'}", param=field)
    return name


def _with_header(ctx: ServingContext, chosen: str | None, field: str) -> str | None:
    header = ctx.adapter_header
    if header is None:
        return chosen
    by_header = _named(ctx, header, HEADER)
    if field and chosen is not None and chosen != by_header:
        raise ValidationError(f"{HEADER} `{header}` and `{field}` `{chosen}` name different adapters",
                              param=field)
    return by_header


def for_native(ctx: ServingContext, adapter_id: str | None) -> str | None:
    """TGI's parameters.adapter_id (and the header): the adapter's name, or None for the base."""
    return _with_header(ctx, _named(ctx, adapter_id, "adapter_id") if adapter_id else None, "adapter_id")


def for_openai(ctx: ServingContext, model: str | None) -> str | None:
    """OpenAI's `model` (and the header): an adapter's name selects it; other names serve the base."""
    chosen = model if model and model in ctx.engine.adapter_names() else None
    return _with_header(ctx, chosen, "model" if chosen else "")
