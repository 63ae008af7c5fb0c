"""Constrained decoding with llguidance: JSON schemas, any JSON, regexes and Lark grammars become a
per-request matcher that masks the logits to the tokens the grammar allows next.

Chosen over xgrammar and outlines-core by measurement on this CPU (bench/grammar_compare.py,
docs/structured_output.md): the cheapest mask per token, the widest JSON-schema coverage,
bounded compile work (errors instead of hangs), and no dependencies.

Compiling happens in the request's HTTP thread (the engine keeps stepping); the engine thread
only fills masks and advances matchers.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import OrderedDict

import torch

from sagellm.errors import ValidationError

KINDS = ("json_schema", "json_object", "regex", "lark")
# Compact separators and no free whitespace: models write JSON this way, and a small model
# given free whitespace can loop on newlines forever.
# oneOf is compiled as anyOf (exclusivity cannot be checked token by token).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                 "coerce_one_of": True}
_ANY_JSON_OBJECT = {"type": "object"}


class GrammarError(ValidationError):
    """A grammar that cannot compile, or takes too long to (422, naming the field)."""


class Grammar:
    """A compiled grammar; `matcher()` gives each request (or choice) its own state."""

    def __init__(self, pristine, description: str, source: str):
        self._pristine = pristine
        self.description = description
        self.source = source  # llguidance's grammar text: what an engine with its own matcher takes

    def matcher(self) -> "Matcher":
        return Matcher(self._pristine.deep_copy())


class Matcher:
    def __init__(self, inner):
        self._m = inner

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-next-token bits into bitmask[row] (int32, 32 tokens per word)."""
        v = bitmask[row]
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)

    def accept(self, token_id: int) -> bool:
        return self._m.consume_token(token_id)

    @property
    def finished(self) -> bool:
        """The grammar allows nothing more: end the request here."""
        return self._m.is_stopped()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set logits[rows[i]] to -inf wherever bitmask[i] has a 0 bit (in place, row views: an
    index_put over the rows costs 4x more at batch 16)."""
    vocab = logits.shape[1]
    forbidden = ((bitmask[:, :, None] >> _BITS) & 1).view(len(rows), -1)[:, :vocab] == 0
    forbidden = forbidden.to(logits.device, non_blocking=True)
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(forbidden, float("-inf"))
        return
    for r, i in enumerate(rows):
        logits[i].masked_fill_(forbidden[r], float("-inf"))


_BITS = torch.arange(32, dtype=torch.int32)


def allocate_bitmask(rows: int, vocab: int) -> torch.Tensor:
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)


class GrammarCompiler:
    """One per tokenizer. Compiled grammars are cached (LRU), so a schema sent with every
    request compiles once."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...],
                 timeout_s: float = 10.0, cache_size: int = 64):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=list(eos_token_ids))
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self.timeout_s = timeout_s
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="sagellm-grammar")

    def compile(self, kind: str, value, param: str) -> Grammar:
        """kind: json_schema (value: a schema dict or JSON text), json_object (value ignored),
        regex or lark (value: text). Raises GrammarError naming `param`."""
        if kind not in KINDS:
            raise GrammarError(f"`{param}` type must be one of {list(KINDS)}. Given: {kind!r}", param=param)
        source = self._source(kind, value, param)
        with self._lock:
            hit = self._cache.get(source)
            if hit is not None:
                self._cache.move_to_end(source)
                return hit
        future = self._pool.submit(self._ll.LLMatcher, self._tokenizer, source, log_level=0, limits=self._limits)
        try:
            matcher = future.result(self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise GrammarError(f"`{param}` took more than {self.timeout_s:g} s to compile; simplify it",
                               param=param) from None
        if matcher.is_error():
            detail = matcher.get_error().strip().splitlines()[0][:300]
            raise GrammarError(f"`{param}` is not a valid {kind.replace('_', ' ')}: {detail}", param=param)
        grammar = Grammar(matcher, kind, source)
        with self._lock:
            self._cache[source] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _source(self, kind: str, value, param: str) -> str:
        LLMatcher = self._ll.LLMatcher
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema(_ANY_JSON_OBJECT, overrides=_JSON_OPTIONS)
        if kind == "json_schema":
            schema = value
            if isinstance(value, str):
                try:
                    schema = json.loads(value)
                except ValueError as exc:
                    raise GrammarError(f"`{param}` is not valid JSON: {exc}", param=param) from None
            if not isinstance(schema, (dict, bool)):
                raise GrammarError(f"`{param}` must be a JSON schema object", param=param)
            try:
                return LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
            except ValueError as exc:
                raise GrammarError(f"`{param}` is not a valid JSON schema: {exc}", param=param) from None
        if not isinstance(value, str) or not value:
            raise GrammarError(f"`{param}` must be a non-empty {kind} string", param=param)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(value)
        return LLMatcher.grammar_from_lark(value)
