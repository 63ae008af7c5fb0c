"""What every API handler receives: the settings, the engine (an EngineClient, the only view of
the engine the API layer has), how this request's streams are watched, and the Responses API's
store (one per server, shared by every request)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sagellm.api.response_store import ResponseStore
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
    # SageMaker's X-Amzn-SageMaker-Adapter-Identifier header, if the request has one (api/adapters.py).
    adapter_header: str | None = None
    # What the request ran with, for its log line and metrics: "adapter" (the LoRA adapter's name).
    notes: dict = field(default_factory=dict)
    store: ResponseStore = field(default_factory=ResponseStore)

    @classmethod
    def serving(cls, settings: Settings, engine: EngineClient) -> ServingContext:
        """The server's context: the store sized by the settings."""
        return cls(settings, engine, store=ResponseStore(settings.responses_store_size,
                                                         settings.responses_store_ttl_s))

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        stream = self.watch(self.engine.submit(prompt_ids, params))
        if params.adapter is not None:
            self.notes["adapter"] = params.adapter
        return stream
