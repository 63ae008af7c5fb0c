"""Body dict -> request model, turning pydantic's errors into one message that names the field."""

from __future__ import annotations

import re
from typing import TypeVar

from pydantic import BaseModel
from pydantic import ValidationError as PydanticError

from sagellm.api.error_shapes import invalid
from sagellm.errors import BadRequest

M = TypeVar("M", bound=BaseModel)
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "literal"}


def field_path(loc: tuple) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif isinstance(p, str) and _FIELD.match(p) and p not in _TYPE_TAGS:
            parts.append(p)
    return ".".join(parts)


def parse(model: type[M], body) -> M:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        return model.model_validate(body)
    except PydanticError as exc:
        err = exc.errors()[0]
        path = field_path(err["loc"]) or "body"
        given = ""
        if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], (dict, list)):
            given = f". Given: {err['input']!r}"
        raise invalid(f"`{path}`: {err['msg']}{given}", path) from None
