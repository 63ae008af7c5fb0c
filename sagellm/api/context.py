"""What every API handler receives: the settings, the engine (an EngineClient, the only view of
the engine the API layer has), and how this request's streams are watched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sagellm.engine.client import EngineClient, RequestStream
from sagellm.engine.sampling_params import SamplingParams
from sagellm.settings import Settings


def _unwatched(stream: RequestStream) -> RequestStream:
    return stream


@dataclass(frozen=True)
class ServingContext:
    settings: Settings
    engine: EngineClient
    # The server wraps each of a request's streams so that a client that goes away aborts it.
    watch: Callable[[RequestStream], RequestStream] = _unwatched

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        return self.watch(self.engine.submit(prompt_ids, params))
