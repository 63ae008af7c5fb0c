"""SageMaker's handler contract for sagellm, the defaults: model_fn / input_fn / predict_fn / output_fn.

These defaults are what `/invocations` does anyway. A `code/inference.py` inside the model
artifacts (`/opt/ml/model/code/inference.py`) may define any of the four to change one step, as
the SageMaker Hugging Face inference toolkit allows; the others stay as below
(sagellm.server.handlers). The top-level `inference.py` re-exports them, so user code can
`import inference` and call them.

- model_fn(model_dir) -> model: the default returns the served engine's ServingContext
  (sagellm.api.context). An override receives the same folder and may return anything its own
  predict_fn understands; `sagellm_context()` gives it the engine.
- input_fn(input_data: bytes, content_type: str) -> data: the default decodes JSON.
- predict_fn(data, model) -> prediction: the default answers `data` as /invocations would (TGI
  native, Messages or completions body): a JSON-able object, or a stream when `data` asks for one.
- output_fn(prediction, accept: str) -> bytes | str | (body, content_type): the default encodes
  JSON. Streams go to the client as they are.
"""

from __future__ import annotations

import json

from sagellm.api import invocations
from sagellm.api.context import ServingContext
from sagellm.api.responses import JsonResponse
from sagellm.errors import BadRequest

_CONTEXT: dict[str, ServingContext] = {}


def set_context(ctx: ServingContext) -> None:
    """The server hands over the running engine once it is ready."""
    _CONTEXT["ctx"] = ctx


def sagellm_context() -> ServingContext:
    """The running engine's ServingContext (for overrides of model_fn / predict_fn)."""
    return _CONTEXT["ctx"]


def model_fn(model_dir: str):
    return sagellm_context()


def input_fn(input_data: bytes, content_type: str):
    try:
        return json.loads(input_data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Failed to parse the request body as JSON: {exc}") from None


def predict_fn(data, model):
    result = invocations.invocations(model, data)
    return result.content() if isinstance(result, JsonResponse) else result


def output_fn(prediction, accept: str):
    return json.dumps(prediction, ensure_ascii=False), "application/json"
