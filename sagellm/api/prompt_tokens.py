"""The one way a request's text becomes tokens at the edge: refused before the tokenizer sees it
when it surely has too many, and, with TGI's `truncate`, only its last tokens kept (the engine
tokenizes just a tail of the text where that gives the same ones)."""

from __future__ import annotations

from collections.abc import Callable

from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import invalid


def tokenize_bounded(ctx: ServingContext, text: str, field: str, limit: int, encode: Callable[..., list] | None = None,
                     truncate: int | None = None) -> list:
    """`encode(text)` (the engine's tokenize by default), refused (422 naming `field`) when the
    text has more than `limit` tokens for sure (engine.tokens_over: a few MB of text cost the
    tokenizer seconds and a GB or more). With `truncate` (0 < truncate <= limit) a longer text is
    allowed: `encode(text, last=truncate)`, its last tokens."""
    encode = encode or ctx.engine.tokenize
    if truncate is not None:
        if not 0 < truncate <= limit:
            raise invalid(f"`truncate` must be strictly positive and less than {limit}. Given: {truncate}", "truncate")
        return encode(text, last=truncate)
    fewest = ctx.engine.tokens_over(text, limit)
    if fewest is not None:
        raise invalid(f"`{field}` must have less than {limit + 1} tokens. Given: {len(text)} characters, "
                      f"at least {fewest} tokens (MAX_INPUT_TOKENS={limit})", field)
    return encode(text)
