"""Submitting a request's sequences to the engine, all or none, and reading one to its end."""

from __future__ import annotations

import dataclasses

from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import generation_failed
from sagellm.engine.client import RequestStream
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import GenerationError


def nth_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sequence `index` of several from one request (choices, best_of): a given seed becomes
    seed + index, so they differ but reproduce; without one each draws its own."""
    if index and params.do_sample and params.seed is not None:
        return dataclasses.replace(params, seed=(params.seed + index) % 2**64)
    return params


def submit_all(ctx: ServingContext, jobs: list[tuple[list[int], SamplingParams]]) -> list[RequestStream]:
    """Every (prompt ids, params) at once, so they share the running batch; when one cannot be
    submitted, the ones already in are aborted."""
    streams: list[RequestStream] = []
    try:
        for ids, params in jobs:
            streams.append(ctx.submit(ids, params))
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    return streams


def submit_n(ctx: ServingContext, ids: list[int], params: SamplingParams, n: int) -> list[RequestStream]:
    return submit_all(ctx, [(ids, nth_params(params, i)) for i in range(n)])


def collect(stream: RequestStream) -> tuple[list[TokenEvent], FinishReason]:
    """Every event of a finished sequence, and how it finished; raises GenerationError (424) when
    the engine failed or aborted it."""
    events: list[TokenEvent] = []
    for ev in stream:
        if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
            raise generation_failed(ev.error)
        events.append(ev)
        if ev.finish_reason is not None:
            return events, ev.finish_reason
    raise GenerationError("Incomplete generation")
