"""sagellm/engine/constraint.py with the bundled model's tokenizer: masks that admit exactly the
grammar's continuations, clear errors, the compile time limit, the cache."""

from __future__ import annotations

import json
import time

import pytest
import torch

from sagellm.engine.constraint import GrammarCompiler, GrammarError, allocate_bitmask, apply_bitmask

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sagellm.model.bundled import bundled_model_dir

    return AutoTokenizer.from_pretrained(bundled_model_dir())


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))


def allowed_after(compiler, tokenizer, kind, value, text: str) -> set[int]:
    matcher = compiler.compile(kind, value, "response_format").matcher()
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        assert matcher.accept(token), (text, tokenizer.decode([token]))
    mask = allocate_bitmask(1, len(tokenizer))
    matcher.fill(mask, 0)
    logits = torch.zeros(1, len(tokenizer))
    apply_bitmask(logits, [0], mask)
    return set(torch.nonzero(logits[0] == 0)[:, 0].tolist())


def test_a_valid_document_walks_to_the_end(compiler, tokenizer):
    matcher = compiler.compile("json_schema", SCHEMA, "response_format").matcher()
    for token in tokenizer(json.dumps({"name": "Ann", "age": 7}), add_special_tokens=False).input_ids:
        assert matcher.accept(token) and matcher.error is None
    assert matcher.finished


def test_masks_admit_only_the_grammar(compiler, tokenizer):
    after_key = allowed_after(compiler, tokenizer, "json_schema", SCHEMA, '{"name": "Ann", "age": ')
    texts = {tokenizer.decode([t]) for t in after_key}
    assert texts and all(t.strip() in ("", "-") or t.strip().lstrip("-").isdigit() for t in texts), sorted(texts)[:20]
    regex = allowed_after(compiler, tokenizer, "regex", "(yes|no)", "")
    assert all("yes".startswith(tokenizer.decode([t])) or "no".startswith(tokenizer.decode([t])) for t in regex)


def test_rows_of_a_larger_batch_are_masked_in_place():
    logits = torch.randn(4, 70)
    before = logits.clone()
    mask = allocate_bitmask(2, 70)
    mask[:, 0] = 0b101  # tokens 0 and 2 allowed in words 0; everything from token 32 on stays allowed
    apply_bitmask(logits, [1, 3], mask)
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    for row in (1, 3):
        blocked = [t for t in range(70) if logits[row, t] == float("-inf")]
        assert blocked == [t for t in range(32) if t not in (0, 2)]


@pytest.mark.parametrize("kind, value, words", [
    ("json_schema", {"type": "nosuchtype"}, "Invalid type"),
    ("json_schema", "{not json", "is not valid JSON"),
    ("json_schema", {"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
    ("regex", "(ab", "not a valid regex"),
    ("lark", "start: missing_rule", "not a valid lark"),
    ("xml", "<a/>", "must be one of"),
])
def test_errors_name_the_field(compiler, kind, value, words):
    with pytest.raises(GrammarError) as err:
        compiler.compile(kind, value, "response_format")
    assert err.value.param == "response_format" and words in err.value.message and err.value.status == 422


def test_a_slow_compile_is_refused_not_waited_for(tokenizer, monkeypatch):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,), timeout_s=0.2)
    real = compiler._ll.LLMatcher

    class Slow:
        grammar_from_json_schema = staticmethod(real.grammar_from_json_schema)

        def __new__(cls, *args, **kw):
            time.sleep(1.0)
            return real(*args, **kw)

    monkeypatch.setattr(compiler._ll, "LLMatcher", Slow)
    t = time.monotonic()
    with pytest.raises(GrammarError, match="took more than 0.2 s to compile"):
        compiler.compile("json_schema", SCHEMA, "grammar")
    assert time.monotonic() - t < 0.9


def test_compiled_grammars_are_cached_and_matchers_independent(compiler, tokenizer):
    first = compiler.compile("json_object", None, "response_format")
    assert compiler.compile("json_object", None, "response_format") is first
    a, b = first.matcher(), first.matcher()
    assert a.accept(tokenizer("{", add_special_tokens=False).input_ids[0])
    mask_a, mask_b = allocate_bitmask(1, len(tokenizer)), allocate_bitmask(1, len(tokenizer))
    a.fill(mask_a, 0)
    b.fill(mask_b, 0)
    assert not torch.equal(mask_a, mask_b)
