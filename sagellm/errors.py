"""One error hierarchy for the whole server; each error knows its HTTP status and TGI error_type."""

from __future__ import annotations


class SagellmError(Exception):
    """Base class. `status` is the HTTP status, `error_type` TGI's kind, `param` the offending field."""

    status = 500
    error_type = "generation"
    openai_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class SettingsError(SagellmError):
    """A bad environment variable; stops start-up (never reaches a client)."""

    status = 500
    error_type = "settings"


class ModelLoadError(SagellmError):
    """The model could not be resolved or loaded; stops start-up with one line."""

    status = 500
    error_type = "model_load"


class BadRequest(SagellmError):
    """Malformed body: not JSON, not an object, wrong content type."""

    status = 400
    error_type = "validation"
    openai_type = "invalid_request_error"


class ValidationError(SagellmError):
    """Well-formed JSON whose fields break a rule; the message names the field and the limit."""

    status = 422
    error_type = "validation"
    openai_type = "invalid_request_error"


class TemplateError(ValidationError):
    """The chat template is missing or raised while rendering the conversation."""

    error_type = "template_error"


class ToolError(ValidationError):
    """`tools` / `tool_choice` that cannot be honoured (TGI's tool_error)."""

    error_type = "tool_error"


class PayloadTooLarge(SagellmError):
    status = 413
    error_type = "validation"
    openai_type = "invalid_request_error"


class UnsupportedMediaType(SagellmError):
    status = 415
    error_type = "validation"
    openai_type = "invalid_request_error"


class Unauthorized(SagellmError):
    status = 401
    error_type = "authentication"
    openai_type = "authentication_error"


class NotFound(SagellmError):
    status = 404
    error_type = "not_found"
    openai_type = "not_found_error"


class Overloaded(SagellmError):
    """More requests in flight than MAX_CONCURRENT_REQUESTS, or the engine is shutting down."""

    status = 429
    error_type = "overloaded"
    openai_type = "rate_limit_error"


class Unavailable(SagellmError):
    """The engine is not ready, stopping, or dead."""

    status = 503
    error_type = "unhealthy"
    openai_type = "server_error"


class GenerationError(SagellmError):
    """The engine failed while generating this request."""

    status = 424
    error_type = "generation"
    openai_type = "server_error"
