"""Errors as clients see them: TGI's, OpenAI's or Anthropic's error shape, as a response body or
as the last event of a stream that fails after its first byte (the status line is gone by then);
which shape a path's clients read; and the wording every route shares."""

from __future__ import annotations

from typing import Literal

from pydantic import MISSING, BaseModel

from sagellm.api.responses import named_sse, sse
from sagellm.errors import GenerationError, SagellmError, ValidationError

Flavor = Literal["tgi", "openai", "anthropic"]


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


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


# Anthropic's error types by HTTP status (its documented list); anything else is an api_error.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                    503: "overloaded_error"}


def flavor_of_path(path: str) -> Flavor:
    """The error shape a route's clients read, for routes that do not say (404, 405): Anthropic's
    under /v1/messages, OpenAI's under the rest of /v1, TGI's elsewhere."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    return "tgi"


def error_body(exc: SagellmError, flavor: Flavor) -> TgiError | OpenAIError | AnthropicError:
    if flavor == "anthropic":
        return AnthropicError(error=AnthropicErrorDetail(type=_ANTHROPIC_TYPES.get(exc.status, "api_error"),
                                                         message=exc.message))
    if flavor == "openai":
        return OpenAIError(error=OpenAIErrorDetail(message=exc.message, type=exc.openai_type, param=exc.param,
                                                   code=exc.status))
    return TgiError(error=exc.message, error_type=exc.error_type)


def error_event(exc: SagellmError, flavor: Flavor) -> bytes:
    body = error_body(exc, flavor)
    if isinstance(body, OpenAIError):
        body.error.http_status_code = exc.status
    if isinstance(body, AnthropicError):  # Anthropic's clients read the event's name
        return named_sse(body)
    return sse(body)


def invalid(message: str, param: str | None = None) -> ValidationError:
    """A field that breaks a rule (422), in TGI's words; the message names the field and the limit."""
    return ValidationError(f"Input validation error: {message}", param=param)


def generation_failed(detail: str | None) -> GenerationError:
    """A request the engine ended with an error (or aborted) after it was accepted (424)."""
    return GenerationError(f"Request failed during generation: {detail or 'aborted'}")


def stream_failure(exc: Exception) -> SagellmError:
    """What the client hears when reading its request's events raised: our own errors as they are
    (503 when the engine died or the server is stopping), anything else a failed generation."""
    return exc if isinstance(exc, SagellmError) else generation_failed(f"internal error ({type(exc).__name__})")
