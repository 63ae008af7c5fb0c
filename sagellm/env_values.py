"""Parsers for environment values: each takes the unquoted, non-empty text and returns the value,
or raises ValueError whose message completes "NAME='raw' is not ..." (sagellm.settings)."""

from __future__ import annotations

import ast
import json
import math
from types import MappingProxyType
from typing import Any, Callable, Mapping


def unquote(raw: str) -> str:
    """Strip whitespace and one layer of quotes, as the SageMaker SDK may JSON-encode or str() values."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        if text[0] == '"':
            # A JSON string may hold escapes (a chat template's "\n"); decode them when it is one.
            try:
                decoded = json.loads(text)
            except ValueError:
                decoded = None
            if isinstance(decoded, str):
                return decoded.strip()
        text = text[1:-1].strip()
    return text


def text(text: str) -> str:
    return text


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("a boolean (true/false, 1/0, yes/no, on/off)")


def integer(expected: str, ok: Callable[[int], bool]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            # "4.0" is what str(float) gives; accept it, but never round "4.5".
            try:
                as_float = float(text)
            except ValueError:
                raise ValueError(expected) from None
            if not as_float.is_integer():
                raise ValueError(expected) from None
            number = int(as_float)
        if not ok(number):
            raise ValueError(expected)
        return number

    return parse


def number(expected: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(expected) from None
        if not math.isfinite(number) or not ok(number):
            raise ValueError(expected)
        return number

    return parse


def choice(allowed: tuple[str, ...], aliases: Mapping[str, Any] | None = None) -> Callable[[str], Any]:
    aliases = aliases or {}

    def parse(text: str) -> str | None:
        lowered = text.lower()
        if lowered in aliases:
            return aliases[lowered]
        if lowered in allowed:
            return lowered
        raise ValueError("one of " + ", ".join(allowed))

    return parse


def json_object(text: str) -> Mapping[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        # str() of a Python dict uses single quotes, which JSON refuses.
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
    if not isinstance(value, dict):
        raise ValueError('a JSON object such as {"enable_thinking": false}')
    return MappingProxyType(value)


positive_int = integer("a positive integer", lambda n: n >= 1)
non_negative_int = integer("a non-negative integer", lambda n: n >= 0)
port = integer("a port number (1 to 65535)", lambda n: 1 <= n <= 65535)
positive_float = number("a positive number", lambda x: x > 0)
non_negative_float = number("a non-negative number", lambda x: x >= 0)
fraction = number("a number above 0 and at most 1", lambda x: 0 < x <= 1)


def num_shard(text: str) -> int:
    if text.lower() == "max":
        return -1
    try:
        return positive_int(text)
    except ValueError:
        raise ValueError("a positive integer or 'max'") from None


def lora_adapters(text: str) -> tuple[tuple[str, str], ...]:
    """TGI's LORA_ADAPTERS: comma-separated `name=path` or a bare path or hub id. A bare local
    path is named by its folder; a bare hub id by the id itself, as TGI names it."""
    out: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, src = item.partition("=")
        name, src = (name.strip(), src.strip()) if sep else ("", item)
        if sep and not (name and src):
            raise ValueError(f"a list of name=path or paths (`{item}` has an empty side)")
        if not name:
            local = src.startswith(("/", "./", "../", "~")) or src.count("/") != 1
            name = src.rstrip("/").rsplit("/", 1)[-1] if local else src
        if any(name == seen for seen, _ in out):
            raise ValueError(f"a list of distinct adapters (`{name}` appears twice)")
        out.append((name, src))
    if not out:
        raise ValueError("a list of name=path or paths")
    return tuple(out)
