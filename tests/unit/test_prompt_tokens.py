"""The one tokenizing entry point of the API (sagellm.api.prompt_tokens.tokenize_bounded), over the
engine client's real text half and the bundled tokenizer: a text surely over the limit is refused
with a 422 naming the request's field before anything tokenizes it; one within it is tokenized as
asked; with `truncate` a longer text is allowed and its last tokens kept."""

from __future__ import annotations

import pytest
from text_only import TextOnly
from transformers import AutoTokenizer

from sagellm.api.context import ServingContext
from sagellm.api.prompt_tokens import tokenize_bounded
from sagellm.engine.client import Limits
from sagellm.errors import ValidationError
from sagellm.settings import Settings

LIMIT = 64


@pytest.fixture(scope="module")
def ctx():
    from sagellm.model import bundled

    tok = AutoTokenizer.from_pretrained(str(bundled.bundled_model_dir(None)))
    engine = TextOnly(tok, None)
    engine.limits = Limits(max_input_tokens=LIMIT, max_total_tokens=2 * LIMIT, max_batch_prefill_tokens=LIMIT,
                           max_batch_total_tokens=4 * LIMIT, max_batch_size=1)
    return ServingContext(Settings(), engine)


@pytest.mark.parametrize("field", ["inputs", "prompt", "messages"])
def test_a_text_surely_over_the_limit_is_refused_naming_its_field_untokenized(ctx, field):
    calls = []

    def encode(text, **kw):
        calls.append(text)
        return ctx.engine.tokenize(text)
    text = "hello world " * 5000
    with pytest.raises(ValidationError) as err:
        tokenize_bounded(ctx, text, field, LIMIT, encode)
    assert err.value.status == 422 and err.value.param == field
    assert f"`{field}` must have less than {LIMIT + 1} tokens" in err.value.message
    assert "at least" in err.value.message and f"Given: {len(text)} characters" in err.value.message
    assert calls == []  # refused before tokenizing


def test_a_text_within_the_bound_is_tokenized_by_the_encoder_asked(ctx):
    text = "hello world " * 10
    assert tokenize_bounded(ctx, text, "inputs", LIMIT) == ctx.engine.tokenize(text)
    spans = tokenize_bounded(ctx, text, "inputs", LIMIT, ctx.engine.tokenize_with_offsets)
    assert [s.token_id for s in spans] == ctx.engine.tokenize(text)
    # Over the limit but not surely so by the length alone: tokenized; the count is the caller's.
    many = "a," * (2 * LIMIT)
    assert len(tokenize_bounded(ctx, many, "prompt", LIMIT)) > LIMIT


def test_truncate_allows_a_longer_text_and_keeps_its_last_tokens(ctx):
    text = "The quick brown fox jumps over the lazy dog. " * 3000  # far over the bound
    whole = ctx.engine.tokenize(text)
    assert tokenize_bounded(ctx, text, "inputs", LIMIT, truncate=5) == whole[-5:]
    spans = tokenize_bounded(ctx, text, "inputs", LIMIT, ctx.engine.tokenize_with_offsets, truncate=LIMIT)
    assert spans == ctx.engine.tokenize_with_offsets(text)[-LIMIT:] and spans[0].start > len(text) - 1000
    for bad in (0, -1, LIMIT + 1):
        with pytest.raises(ValidationError) as err:
            tokenize_bounded(ctx, text, "inputs", LIMIT, truncate=bad)
        assert err.value.param == "truncate" and f"less than {LIMIT}. Given: {bad}" in err.value.message
