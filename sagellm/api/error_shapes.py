"""Errors as clients see them: TGI's or OpenAI's error shape, as a response body or as the last
event of a stream that fails after its first byte (the status line is gone by then); and the
wording every route shares."""

from __future__ import annotations

from typing import Literal

from pydantic import MISSING, BaseModel

from sagellm.api.responses import sse
from sagellm.errors import GenerationError, SagellmError, ValidationError

Flavor = Literal["tgi", "openai"]


class TgiError(BaseModel):
    error: str
    error_type: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int
    http_status_code: int | MISSING = MISSING  # in a stream, where the status line said 200


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


def error_body(exc: SagellmError, flavor: Flavor) -> TgiError | OpenAIError:
    if flavor == "openai":
        return OpenAIError(error=OpenAIErrorDetail(message=exc.message, type=exc.openai_type, param=exc.param,
                                                   code=exc.status))
    return TgiError(error=exc.message, error_type=exc.error_type)


def error_event(exc: SagellmError, flavor: Flavor) -> bytes:
    body = error_body(exc, flavor)
    if isinstance(body, OpenAIError):
        body.error.http_status_code = exc.status
    return sse(body)


def invalid(message: str, param: str | None = None) -> ValidationError:
    """A field that breaks a rule (422), in TGI's words; the message names the field and the limit."""
    return ValidationError(f"Input validation error: {message}", param=param)


def generation_failed(detail: str | None) -> GenerationError:
    """A request the engine ended with an error (or aborted) after it was accepted (424)."""
    return GenerationError(f"Request failed during generation: {detail or 'aborted'}")
