"""Compare constrained-decoding grammar libraries on CPU: llguidance, xgrammar, outlines-core.

For each library this measures tokenizer setup, grammar compile time, per-token mask and
apply cost (single sequence and a batch of 16), JSON-schema feature coverage (including
whether a keyword is really enforced or silently ignored), error behaviour on invalid
schemas, and memory.  Each library runs in its own subprocess so that memory numbers are
not mixed up and a crash or hang in one library cannot take the whole run down.

    HF_HUB_OFFLINE=1 python bench/grammar_compare.py [--tokenizer PATH] [--libs a,b]

Needs: torch, transformers, llguidance, xgrammar, outlines-core (missing ones are reported).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_TOKENIZER = os.path.expanduser("~/.cache/sagellm/smollm2-135m-instruct")
LIBS = ("llguidance", "xgrammar", "outlines-core")
BATCH = 16
WALK_REPS = 20  # timed repetitions of the token-by-token walk
MATCHERS_FOR_MEMORY = 1000
STARTUP_TIMEOUT_S = (
    120  # worker start: imports, HF tokenizer load, library tokenizer setup
)

# --------------------------------------------------------------------------------------
# Grammars under test
# --------------------------------------------------------------------------------------

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "zip"],
            "additionalProperties": False,
        },
        "tags": {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 1,
            "maxItems": 4,
        },
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}

PERSON_INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "editor",
    "address": {"street": "12 St James's Square", "zip": "10001"},
    "tags": ["math", "engines", "poetry"],
}


def _function(name: str, params: dict, required: list[str]) -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"const": name},
            "arguments": {
                "type": "object",
                "properties": params,
                "required": required,
                "additionalProperties": False,
            },
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


TOOL_SCHEMA = {
    "$defs": {
        "get_weather": _function(
            "get_weather",
            {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            ["city"],
        ),
        "search_docs": _function(
            "search_docs",
            {
                "query": {"type": "string"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 50},
            },
            ["query", "limit"],
        ),
    },
    "oneOf": [{"$ref": "#/$defs/get_weather"}, {"$ref": "#/$defs/search_docs"}],
}

TOOL_SCHEMA_ANYOF = {"$defs": TOOL_SCHEMA["$defs"], "anyOf": TOOL_SCHEMA["oneOf"]}

REGEX = r"(yes|no|maybe)( because [a-z ]{1,40})?"

LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""

# name -> (kind, spec, a valid sample text)
GRAMMARS: dict[str, tuple[str, Any, str]] = {
    "a) nested schema": ("schema", PERSON_SCHEMA, json.dumps(PERSON_INSTANCE)),
    "b) json_object": (
        "json_object",
        None,
        json.dumps({"k": [1, 2.5, {"x": None}], "ok": True}),
    ),
    "c) regex": ("regex", REGEX, "maybe because it is late"),
    "d) tool-call oneOf+$ref": (
        "schema",
        TOOL_SCHEMA,
        json.dumps(
            {"name": "search_docs", "arguments": {"query": "bitmask", "limit": 5}}
        ),
    ),
    "d2) same tool-call with anyOf": (
        "schema",
        TOOL_SCHEMA_ANYOF,
        json.dumps(
            {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
        ),
    ),
    "e) lark (arith)": ("lark", LARK, "(12+3)-45"),
}

# Feature coverage: name -> (schema, valid instance, instance violating the feature).
_TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["value", "children"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}


def _tree(depth: int) -> dict:
    return {"value": depth, "children": [_tree(depth - 1)] if depth > 1 else []}


_POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}

FEATURES: dict[str, tuple[dict, Any, Any]] = {
    "nested objects": (
        {
            "type": "object",
            "properties": {
                "a": {
                    "type": "object",
                    "properties": {
                        "b": {
                            "type": "object",
                            "properties": {"c": {"type": "integer"}},
                            "required": ["c"],
                        }
                    },
                    "required": ["b"],
                }
            },
            "required": ["a"],
        },
        {"a": {"b": {"c": 1}}},
        {"a": {"b": {"c": "x"}}},
    ),
    "array minItems/maxItems": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
        [1, 2],
        [1, 2, 3, 4],
    ),
    "enum": ({"type": "string", "enum": ["red", "green", "blue"]}, "green", "pink"),
    "const": ({"const": "fixed"}, "fixed", "other"),
    "anyOf": (
        {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
        "ab",
        True,
    ),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    "allOf": (
        {
            "allOf": [
                {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}},
                    "required": ["a"],
                },
                {
                    "type": "object",
                    "properties": {"b": {"type": "string"}},
                    "required": ["b"],
                },
            ]
        },
        {"a": 1, "b": "x"},
        {"a": 1},
    ),
    "$ref/$defs": (
        {
            "$defs": {"pt": _POINT},
            "type": "object",
            "properties": {
                "start": {"$ref": "#/$defs/pt"},
                "end": {"$ref": "#/$defs/pt"},
            },
            "required": ["start", "end"],
            "additionalProperties": False,
        },
        {"start": {"x": 0, "y": 1}, "end": {"x": 2, "y": 3}},
        {"start": {"x": 0}, "end": {"x": 2, "y": 3}},
    ),
    "recursive $ref (tree, depth 5)": (
        _TREE,
        _tree(5),
        {"value": 1, "children": [{"children": []}]},
    ),
    "pattern": (
        {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "ABC-12",
        "abc-12",
    ),
    "format date-time": (
        {"type": "string", "format": "date-time"},
        "2024-05-01T12:30:00Z",
        "yesterday",
    ),
    "format email": (
        {"type": "string", "format": "email"},
        "ada.l@example.com",
        "not-an-email",
    ),
    "minLength/maxLength": (
        {"type": "string", "minLength": 2, "maxLength": 5},
        "abc",
        "abcdefg",
    ),
    "integer minimum/maximum": (
        {"type": "integer", "minimum": 10, "maximum": 20},
        15,
        25,
    ),
    "number exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    "additionalProperties false": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "additionalProperties": False,
        },
        {"a": 1},
        {"a": 1, "z": 2},
    ),
    "additionalProperties schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"x": 1, "y": 2},
        {"x": "s"},
    ),
    "patternProperties": (
        {
            "type": "object",
            "patternProperties": {"^x_": {"type": "integer"}},
            "additionalProperties": False,
        },
        {"x_a": 1},
        {"y": 1},
    ),
    'nullable type ["string","null"]': ({"type": ["string", "null"]}, None, 1),
    "uniqueItems": (
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        [1, 2],
        [1, 1],
    ),
    "not": ({"not": {"type": "string"}}, 1, "s"),
}

INVALID_SCHEMAS: dict[str, dict] = {
    'type "nosuchtype"': {"type": "nosuchtype"},
    "bad pattern regex": {"type": "string", "pattern": "([a-z"},
    "dangling $ref": {
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/missing"}},
    },
    "minItems > maxItems": {"type": "array", "minItems": 3, "maxItems": 1},
}


class CompileError(Exception):
    """A grammar/schema the library refused (as opposed to a bug in this script)."""


def first_line(exc: BaseException | str, limit: int = 150) -> str:
    """The start of an error message, on one line (continuation lines joined with ' / ')."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = " / ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Library adapters: one small class per library, same interface
# --------------------------------------------------------------------------------------


class Backend:
    name = ""
    has_cache = False
    apply_fn = ""

    def setup(
        self, hf_tok: Any, vocab_size: int
    ) -> None:  # build the library's tokenizer info
        raise NotImplementedError

    def compile(
        self, kind: str, spec: Any
    ) -> Any:  # kind: schema | json_object | regex | lark
        raise NotImplementedError

    def clear_cache(self) -> None:
        pass

    def new_matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        raise NotImplementedError

    def fill_batch(self, matchers: list, bitmask: Any) -> None:
        for i, m in enumerate(matchers):
            self.fill(m, bitmask, i)

    def apply(self, logits: Any, bitmask: Any) -> None:
        raise NotImplementedError

    def consume(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def consume_batch(self, matchers: list, tokens: list[int]) -> list[bool]:
        return [self.consume(m, t) for m, t in zip(matchers, tokens)]

    def is_accepting(self, matcher: Any) -> bool:
        raise NotImplementedError

    def compiled_size(self, compiled: Any) -> int | None:
        return None


class LLGuidanceBackend(Backend):
    name = "llguidance"
    apply_fn = "llguidance.torch.apply_token_bitmask_inplace (torch.compile)"

    def __init__(self) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llg_hf = llguidance.hf
        self.llg_torch = llguidance.torch

    def setup(self, hf_tok, vocab_size):
        self.tok = self.llg_hf.from_tokenizer(hf_tok, n_vocab=vocab_size)
        self.executor = (
            self.llg.LLExecutor()
        )  # default threads: 80% of CPUs, at most 32

    def compile(self, kind, spec):
        M = self.llg.LLMatcher
        if kind == "schema":
            grammar = M.grammar_from_json_schema(spec)
        elif kind == "json_object":
            grammar = M.grammar_from_json_schema({"type": "object"})
        elif kind == "regex":
            grammar = M.grammar_from_regex(spec)
        else:
            grammar = M.grammar_from_lark(spec)
        # The constructor never raises for grammar errors: the matcher enters an error state.
        matcher = M(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise CompileError(matcher.get_error())
        return matcher  # a pristine matcher; new requests use deep_copy()

    def new_matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask, row):
        self.llg_torch.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers, bitmask):
        self.llg_torch.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def apply(self, logits, bitmask):
        self.llg_torch.apply_token_bitmask_inplace(logits, bitmask)

    def consume(self, matcher, token):
        return matcher.consume_token(token)

    def consume_batch(self, matchers, tokens):
        return self.llg_torch.consume_token_par(
            self.executor, list(zip(matchers, tokens))
        )

    def is_accepting(self, matcher):
        return matcher.is_accepting()


class XGrammarBackend(Backend):
    name = "xgrammar"
    has_cache = True
    apply_fn = "xgrammar.apply_token_bitmask_inplace (native CPU kernel)"

    def __init__(self) -> None:
        import xgrammar

        self.xgr = xgrammar

    def setup(self, hf_tok, vocab_size):
        self.info = self.xgr.TokenizerInfo.from_huggingface(
            hf_tok, vocab_size=vocab_size
        )
        self.compiler = self.xgr.GrammarCompiler(self.info)
        self.batcher = (
            self.xgr.BatchGrammarMatcher()
        )  # default threads: hardware threads / 2

    def compile(self, kind, spec):
        try:
            if kind == "schema":
                return self.compiler.compile_json_schema(json.dumps(spec))
            if kind == "json_object":
                return self.compiler.compile_json_schema('{"type": "object"}')
            if kind == "regex":
                return self.compiler.compile_regex(spec)
            return self.compiler.compile_lark(spec)
        except (
            Exception
        ) as exc:  # xgrammar raises RuntimeError / ValueError / InvalidJSONError
            raise CompileError(f"{type(exc).__name__}: {exc}") from exc

    def clear_cache(self):
        self.compiler.clear_cache()

    def new_matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask, row):
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers, bitmask):
        self.batcher.batch_fill_next_token_bitmask(matchers, bitmask)

    def apply(self, logits, bitmask):
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def consume(self, matcher, token):
        return matcher.accept_token(token)

    def consume_batch(self, matchers, tokens):
        return self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)

    def is_accepting(self, matcher):
        return matcher.is_completed()

    def compiled_size(self, compiled):
        return compiled.memory_size_bytes


def _byte_level_decoder() -> dict[str, int]:
    """Map each character of a byte-level BPE vocabulary back to the raw byte it encodes.

    Byte-level BPE spells every byte as a printable character: bytes that are already
    printable (and not space) stand for themselves, the remaining bytes are assigned the
    code points 256, 257, ... in increasing byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


class OutlinesCoreBackend(Backend):
    name = "outlines-core"
    apply_fn = "outlines_core.kernels.torch.apply_token_bitmask_inplace (torch.compile)"

    def __init__(self) -> None:
        import outlines_core
        import outlines_core.kernels.torch

        self.oc = outlines_core
        self.oc_torch = outlines_core.kernels.torch

    def setup(self, hf_tok, vocab_size):
        # Vocabulary.from_pretrained needs the hub; build it from the local tokenizer instead.
        decode = _byte_level_decoder()
        special = set(hf_tok.all_special_ids) | {
            tid for tid, added in hf_tok.added_tokens_decoder.items() if added.special
        }  # special tokens must never match grammar text; EOS is passed separately
        tokens: dict[bytes, list[int]] = {}
        for text, tid in hf_tok.get_vocab().items():
            if tid in special or tid >= vocab_size:
                continue
            if all(ch in decode for ch in text):
                raw = bytes(decode[ch] for ch in text)
            else:  # an added, non byte-level token
                raw = text.encode("utf-8")
            tokens.setdefault(raw, []).append(tid)
        self.vocab = self.oc.Vocabulary(hf_tok.eos_token_id, tokens)

    def compile(self, kind, spec):
        try:
            if kind == "schema":
                regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec))
            elif kind == "json_object":
                regex = self.oc.json_schema.build_regex_from_schema(
                    '{"type": "object"}'
                )
            elif kind == "regex":
                regex = spec
            else:
                raise CompileError("no Lark/CFG support in outlines-core (regex only)")
            return self.oc.Index(regex, self.vocab)
        except CompileError:
            raise
        except Exception as exc:
            raise CompileError(f"{type(exc).__name__}: {exc}") from exc

    def new_matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, bitmask, row):
        # kernels.torch.fill_next_token_bitmask only accepts a [1, words] mask, so write the
        # batch row through the underlying call it wraps.
        target = bitmask[row]
        matcher.write_mask_into(
            target.data_ptr(), target.numel(), target.element_size()
        )

    def apply(self, logits, bitmask):
        self.oc_torch.apply_token_bitmask_inplace(
            logits.view(bitmask.shape[0], -1), bitmask
        )

    def consume(self, matcher, token):
        try:
            matcher.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False

    def is_accepting(self, matcher):
        return matcher.is_finished()


BACKENDS: dict[str, Callable[[], Backend]] = {
    "llguidance": LLGuidanceBackend,
    "xgrammar": XGrammarBackend,
    "outlines-core": OutlinesCoreBackend,
}

# --------------------------------------------------------------------------------------
# Worker side: runs the measurements for one library, one "task" at a time
# --------------------------------------------------------------------------------------


def torch_apply(logits, bitmask) -> None:
    """Library-independent reference: unpack the int32 bitmask and mask logits to -inf."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)
    logits.masked_fill_(
        ~allowed[..., : logits.shape[-1]].view(logits.shape), float("-inf")
    )


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_bytes() -> int:
    """Bytes currently handed out by glibc malloc (where native libraries allocate).

    RSS is too coarse for per-matcher sizes because freed pages get reused."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def now_us() -> float:
    return time.perf_counter_ns() / 1000


class Worker:
    def __init__(self, lib: str, tokenizer_path: str) -> None:
        self.lib = lib
        self.tokenizer_path = tokenizer_path
        self.backend: Backend | None = None
        self.compiled: dict[str, Any] = {}

    # -- shared helpers ---------------------------------------------------------------
    def _load_hf(self) -> None:
        """Load torch and the HF tokenizer (not under test); idempotent."""
        if hasattr(self, "hf_tok"):
            return
        import torch
        import transformers

        self.torch = torch
        self.hf_tok = transformers.AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.vocab_size = len(self.hf_tok)
        self.words = (self.vocab_size + 31) // 32

    def ready(self) -> Backend:
        if self.backend is None:
            self._load_hf()
            backend = BACKENDS[self.lib]()
            backend.setup(self.hf_tok, self.vocab_size)
            self.backend = backend
        return self.backend

    def grammar(self, name: str) -> Any:
        if name not in self.compiled:
            kind, spec, _ = GRAMMARS[name]
            self.compiled[name] = self.ready().compile(kind, spec)
        return self.compiled[name]

    def encode(self, text: str) -> list[int]:
        return self.hf_tok.encode(text, add_special_tokens=False)

    def bitmask(self, rows: int):
        return self.torch.full((rows, self.words), -1, dtype=self.torch.int32)

    def accepts(self, compiled: Any, text: str) -> bool:
        backend = self.ready()
        matcher = backend.new_matcher(compiled)
        return all(
            backend.consume(matcher, t) for t in self.encode(text)
        ) and backend.is_accepting(matcher)

    # -- tasks ------------------------------------------------------------------------
    def task_setup(self) -> dict:
        self._load_hf()
        rss0, _ = rss_mb()
        t0 = time.perf_counter()
        backend = BACKENDS[self.lib]()  # importing the library counts as part of setup
        import_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        backend.setup(self.hf_tok, self.vocab_size)
        cold_ms = (time.perf_counter() - t0) * 1000
        rss1, _ = rss_mb()
        t0 = time.perf_counter()
        BACKENDS[self.lib]().setup(self.hf_tok, self.vocab_size)
        repeat_ms = (time.perf_counter() - t0) * 1000
        self.backend = backend
        gc.collect()
        return {
            "import_ms": import_ms,
            "cold_ms": cold_ms,
            "repeat_ms": repeat_ms,
            "rss_delta_mb": rss1 - rss0,
        }

    def task_compile(self, name: str) -> dict:
        backend = self.ready()
        kind, spec, sample = GRAMMARS[name]
        out: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            compiled = backend.compile(kind, spec)
            out["first_ms"] = (time.perf_counter() - t0) * 1000
        except CompileError as exc:
            return {"error": first_line(exc)}
        t0 = time.perf_counter()
        backend.compile(kind, spec)
        out["repeat_ms"] = (time.perf_counter() - t0) * 1000
        if backend.has_cache:  # also a real recompile, bypassing the cache
            backend.clear_cache()
            t0 = time.perf_counter()
            backend.compile(kind, spec)
            out["nocache_ms"] = (time.perf_counter() - t0) * 1000
        # Time to first mask on a fresh matcher: catches work a library defers past compile.
        mask = self.bitmask(1)
        t0 = now_us()
        backend.fill(backend.new_matcher(compiled), mask, 0)
        out["first_mask_us"] = now_us() - t0
        out["sample_ok"] = self.accepts(compiled, sample)
        out["size_bytes"] = backend.compiled_size(compiled)
        self.compiled[name] = compiled
        return out

    def task_memory(self) -> dict:
        """Runs in a fresh process. Heap = bytes malloc'ed (native allocations of the library)."""
        self._load_hf()
        gc.collect()
        heap0, rss0 = heap_bytes(), rss_mb()[0]
        backend = self.ready()
        gc.collect()
        heap1, rss1 = heap_bytes(), rss_mb()[0]
        per_grammar = {}
        for name in GRAMMARS:
            before = heap_bytes()
            try:
                self.grammar(name)
                gc.collect()
                per_grammar[name] = (heap_bytes() - before) / 1024
            except CompileError:
                per_grammar[name] = None
        heap2, rss2 = heap_bytes(), rss_mb()[0]

        compiled = self.grammar("a) nested schema")
        prefix = self.encode(json.dumps(PERSON_INSTANCE))[:12]
        mask = self.bitmask(1)

        def make_matchers(count: int) -> list:
            matchers = []
            for _ in range(count):
                m = backend.new_matcher(compiled)
                for t in prefix:
                    backend.consume(m, t)
                backend.fill(m, mask, 0)
                matchers.append(m)
            return matchers

        make_matchers(
            20
        )  # warm lazily built state (e.g. lexer caches) before measuring
        gc.collect()
        heap3 = heap_bytes()
        matchers = make_matchers(MATCHERS_FOR_MEMORY)
        gc.collect()
        heap4 = heap_bytes()
        del matchers
        return {
            "setup_heap_mb": (heap1 - heap0) / 2**20,
            "setup_rss_mb": rss1 - rss0,
            "compile_all_heap_mb": (heap2 - heap1) / 2**20,
            "compile_all_rss_mb": rss2 - rss1,
            "per_grammar_kb": per_grammar,
            "per_matcher_kb": (heap4 - heap3) / 1024 / MATCHERS_FOR_MEMORY,
            "peak_mb": rss_mb()[1],
        }

    def task_walk(self) -> dict:
        backend, torch = self.ready(), self.torch
        compiled = self.grammar("a) nested schema")
        tokens = self.encode(json.dumps(PERSON_INSTANCE))
        eos = self.hf_tok.eos_token_id
        mask = self.bitmask(1)
        base = torch.randn(self.vocab_size, dtype=torch.float32)
        logits = base.clone()
        t0 = time.perf_counter()
        backend.apply(logits, mask)  # torch.compile'd kernels compile on first call
        warmup_ms = (time.perf_counter() - t0) * 1000

        fill_us: list[float] = []
        apply_us: list[float] = []
        ref_us: list[float] = []
        same_as_ref = True
        first_walk_ms = 0.0
        all_allowed = True
        accepting = eos_allowed = False
        for rep in range(WALK_REPS + 1):
            matcher = backend.new_matcher(compiled)
            walk_start = time.perf_counter()
            for token in tokens:
                t0 = now_us()
                backend.fill(matcher, mask, 0)
                t1 = now_us()
                logits.copy_(base)
                t2 = now_us()
                backend.apply(logits, mask)
                t3 = now_us()
                reference = base.clone()
                t4 = now_us()
                torch_apply(reference, mask)
                t5 = now_us()
                bit_set = (int(mask[0, token // 32]) >> (token % 32)) & 1 == 1
                allowed = bit_set and bool(logits[token] != float("-inf"))
                consumed = backend.consume(matcher, token)
                all_allowed &= allowed and consumed
                if rep > 0:  # rep 0 is the cold walk
                    fill_us.append(t1 - t0)
                    apply_us.append(t3 - t2)
                    ref_us.append(t5 - t4)
                    same_as_ref &= bool(torch.equal(reference, logits))
            if rep == 0:
                first_walk_ms = (time.perf_counter() - walk_start) * 1000
            accepting = backend.is_accepting(matcher)
            backend.fill(matcher, mask, 0)
            eos_allowed = (int(mask[0, eos // 32]) >> (eos % 32)) & 1 == 1
        return {
            "tokens": len(tokens),
            "mask_mean_us": sum(fill_us) / len(fill_us),
            "mask_p50_us": percentile(fill_us, 50),
            "mask_p99_us": percentile(fill_us, 99),
            "apply_mean_us": sum(apply_us) / len(apply_us),
            "apply_p50_us": percentile(apply_us, 50),
            "apply_p99_us": percentile(apply_us, 99),
            "apply_warmup_ms": warmup_ms,
            "ref_apply_mean_us": sum(ref_us) / len(ref_us),
            "same_as_ref": same_as_ref,
            "first_walk_ms": first_walk_ms,
            "all_allowed": all_allowed,
            "accepting": accepting,
            "eos_allowed": eos_allowed,
        }

    def task_batch(self) -> dict:
        backend, torch = self.ready(), self.torch
        compiled = self.grammar("a) nested schema")
        roles = PERSON_SCHEMA["properties"]["role"]["enum"]
        sequences = []
        for i in range(BATCH):  # 16 different, valid documents of different lengths
            doc = dict(
                PERSON_INSTANCE,
                name=f"user {i} " + "x" * (i * 3),
                age=i * 7,
                role=roles[i % 3],
                tags=[f"t{j}" for j in range(1 + i % 4)],
            )
            sequences.append(self.encode(json.dumps(doc)))
        mask = self.bitmask(BATCH)
        base = torch.randn(BATCH, self.vocab_size, dtype=torch.float32)
        logits = base.clone()
        backend.apply(logits, mask)  # warm-up (torch.compile, batch shape)

        loop_mask = self.bitmask(BATCH)
        fill_us, loop_us, apply_us, consume_us = [], [], [], []
        all_ok = same_masks = True
        for rep in range(4):
            matchers = [backend.new_matcher(compiled) for _ in range(BATCH)]
            for step in range(max(map(len, sequences))):
                t0 = now_us()
                backend.fill_batch(matchers, mask)
                t1 = now_us()
                for row, m in enumerate(matchers):  # the same, one matcher at a time
                    backend.fill(m, loop_mask, row)
                loop_us.append(now_us() - t1)
                same_masks &= bool(torch.equal(mask, loop_mask))
                logits.copy_(base)
                t2 = now_us()
                backend.apply(logits, mask)
                t3 = now_us()
                live = [i for i, seq in enumerate(sequences) if step < len(seq)]
                ok = backend.consume_batch(
                    [matchers[i] for i in live], [sequences[i][step] for i in live]
                )
                t4 = now_us()
                all_ok &= all(ok)
                if rep > 0:
                    fill_us.append(t1 - t0)
                    apply_us.append(t3 - t2)
                    consume_us.append(t4 - t3)
            all_ok &= all(backend.is_accepting(m) for m in matchers)
        return {
            "steps": max(map(len, sequences)),
            "fill_mean_us": sum(fill_us) / len(fill_us),
            "fill_p99_us": percentile(fill_us, 99),
            "loop_mean_us": sum(loop_us) / len(loop_us),
            "apply_mean_us": sum(apply_us) / len(apply_us),
            "consume_mean_us": sum(consume_us) / len(consume_us),
            "all_ok": all_ok and same_masks,
        }

    def task_feature(self, name: str) -> dict:
        backend = self.ready()
        schema, valid, invalid = FEATURES[name]
        t0 = time.perf_counter()
        try:
            compiled = backend.compile("schema", schema)
        except CompileError as exc:
            return {"verdict": "ERR", "message": first_line(exc)}
        ms = (time.perf_counter() - t0) * 1000
        if not self.accepts(compiled, json.dumps(valid)):
            return {"verdict": "rejects valid", "ms": ms}
        if self.accepts(compiled, json.dumps(invalid)):
            return {"verdict": "ignored (accepts invalid)", "ms": ms}
        return {"verdict": "OK", "ms": ms}

    def task_invalid(self, name: str) -> dict:
        backend = self.ready()
        try:
            backend.compile("schema", INVALID_SCHEMAS[name])
        except CompileError as exc:
            return {"verdict": "error", "message": first_line(exc)}
        return {"verdict": "accepted silently"}


def task_list(group: str) -> list[str]:
    if (
        group == "memory"
    ):  # needs a process of its own: compiling earlier would skew RSS
        return ["memory"]
    return (
        ["setup"]
        + [f"compile:{n}" for n in GRAMMARS]
        + ["walk", "batch"]
        + [f"feature:{n}" for n in FEATURES]
        + [f"invalid:{n}" for n in INVALID_SCHEMAS]
    )


def run_tasks(worker: Worker, group: str, start: int) -> None:
    names = task_list(group)[start:]
    # Shared preparation happens before the first task so that it does not count against
    # a task's timeout; "setup" and "memory" measure the library's own setup themselves.
    if names and names[0] in ("setup", "memory"):
        worker._load_hf()
    elif names:
        worker.ready()
    for name in names:
        print("@@START " + json.dumps(name), flush=True)
        kind, _, arg = name.partition(":")
        method = getattr(worker, f"task_{kind}")
        try:
            result = method(arg) if arg else method()
        except Exception as exc:  # noqa: BLE001 - record a bug/unexpected library error, go on
            result = {"exception": f"{type(exc).__name__}: {first_line(exc)}"}
        print("@@DONE " + json.dumps([name, result]), flush=True)


# --------------------------------------------------------------------------------------
# Parent side: run each library in a subprocess, restart past crashes/hangs
# --------------------------------------------------------------------------------------


def run_library(lib: str, args: argparse.Namespace) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for group in ("main", "memory"):
        results.update(run_group(lib, group, args))
    return results


def run_group(lib: str, group: str, args: argparse.Namespace) -> dict[str, dict]:
    """Run one worker process over the group's tasks; restart it after a crash or hang."""
    tasks = task_list(group)
    results: dict[str, dict] = {}
    start = 0
    while start < len(tasks):
        with tempfile.TemporaryFile() as err:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                lib,
                "--group",
                group,
                "--start",
                str(start),
                "--tokenizer",
                args.tokenizer,
            ]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
            current, buffer = None, b""
            selector = selectors.DefaultSelector()
            selector.register(proc.stdout, selectors.EVENT_READ)
            deadline = (
                time.monotonic() + STARTUP_TIMEOUT_S + args.timeout
            )  # imports, tokenizers
            timed_out = False
            while True:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    timed_out = True
                    proc.kill()
                    break
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    if line.startswith("@@START "):
                        current = json.loads(line[8:])
                        deadline = time.monotonic() + args.timeout
                    elif line.startswith("@@DONE "):
                        name, result = json.loads(line[7:])
                        results[name] = result
                        current = None
            rc = proc.wait()
            selector.close()
            if current is None:  # finished, or died between tasks (e.g. at import)
                err.seek(0)
                tail = err.read().decode("utf-8", "replace").strip().splitlines()[-2:]
                for name in tasks[start:]:
                    results.setdefault(
                        name,
                        {"exception": f"worker exited rc={rc}: {' | '.join(tail)}"},
                    )
                break
            if timed_out:
                results[current] = {
                    "timeout": f"no result after {args.timeout:.0f}s (killed)"
                }
            else:
                err.seek(0)
                tail = err.read().decode("utf-8", "replace").strip().splitlines()[-1:]
                results[current] = {
                    "crash": f"process died rc={rc}: {' | '.join(tail)}"
                }
            start = tasks.index(current) + 1
    return results


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "NO"
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def result_table(get, libs: list[str], task: str, columns: list[tuple[str, str]]) -> None:
    """One row per library: its failure, or the named fields of its `task` result."""
    rows = []
    for lib in libs:
        r = get(lib, task)
        bad = failure(r)
        rows.append([lib, bad] + [None] * (len(columns) - 1) if bad else [lib] + [r[key] for _, key in columns])
    print(table(["library"] + [header for header, _ in columns], rows))


def failure(result: dict) -> str | None:
    for key in ("exception", "timeout", "crash", "error"):
        if key in result:
            return f"{key.upper()}: {result[key]}"
    return None


def report(all_results: dict[str, dict[str, dict]], libs: list[str]) -> None:
    def get(lib: str, task: str) -> dict:
        return all_results[lib].get(task, {"exception": "not run"})

    print(
        "\n## 1. Tokenizer setup (build the library's tokenizer info from the HF tokenizer)\n"
    )
    rows = []
    for lib in libs:
        r = get(lib, "setup")
        rows.append(
            [
                lib,
                failure(r) or r["import_ms"],
                r.get("cold_ms"),
                r.get("repeat_ms"),
                r.get("rss_delta_mb"),
            ]
        )
    print(
        table(
            [
                "library",
                "import ms",
                "tokenizer setup ms (cold)",
                "setup ms (repeat)",
                "RSS delta MiB",
            ],
            rows,
        )
    )

    print("\n## 2. Grammar compile\n")
    print(
        "repeat = same grammar again (cache hit where the library caches); no-cache = after "
        "clear_cache(); first mask = fill on a fresh matcher right after compile.\n"
    )
    rows = []
    for name in GRAMMARS:
        for lib in libs:
            r = get(lib, f"compile:{name}")
            bad = failure(r)
            if bad:
                rows.append([name, lib, bad, None, None, None, None, None])
                continue
            size = r.get("size_bytes")
            rows.append(
                [
                    name,
                    lib,
                    r["first_ms"],
                    r["repeat_ms"],
                    r.get("nocache_ms"),
                    r["first_mask_us"],
                    r["sample_ok"],
                    f"{size / 1024:.0f}" if size else None,
                ]
            )
    print(
        table(
            [
                "grammar",
                "library",
                "first ms",
                "repeat ms",
                "no-cache ms",
                "first mask µs",
                "valid sample accepted",
                "compiled KiB",
            ],
            rows,
        )
    )

    print(
        f"\n## 3. Per-token cost, schema (a), batch 1 (warm: {WALK_REPS} walks; logits float32 [vocab])\n"
    )
    result_table(get, libs, "walk", [
        ("tokens", "tokens"), ("mask mean µs", "mask_mean_us"), ("mask p50 µs", "mask_p50_us"),
        ("mask p99 µs", "mask_p99_us"), ("apply mean µs", "apply_mean_us"), ("apply p50 µs", "apply_p50_us"),
        ("apply p99 µs", "apply_p99_us"), ("plain-torch apply µs", "ref_apply_mean_us"),
        ("apply == plain torch", "same_as_ref"), ("cold walk ms", "first_walk_ms"),
        ("apply 1st-call ms", "apply_warmup_ms"), ("every token allowed", "all_allowed"),
        ("accepting at end", "accepting"), ("EOS allowed at end", "eos_allowed")])
    print(
        "\napply functions: "
        + "; ".join(f"{lib}: {BACKENDS[lib].apply_fn}" for lib in libs)
    )

    print(
        f"\n## 3b. Batch {BATCH}: {BATCH} independent matchers, one [{BATCH}, words] bitmask, per decode step\n"
    )
    result_table(get, libs, "batch", [
        ("steps", "steps"), ("batch fill mean µs/step", "fill_mean_us"), ("batch fill p99 µs/step", "fill_p99_us"),
        ("one-by-one fill mean µs/step", "loop_mean_us"), (f"apply [{BATCH},V] µs", "apply_mean_us"),
        ("consume µs/step", "consume_mean_us"), ("all valid, masks equal", "all_ok")])
    print(
        "\nbatch fill: llguidance fill_next_token_bitmask_par(LLExecutor()); xgrammar "
        "BatchGrammarMatcher().batch_fill_next_token_bitmask (both with their default thread counts); "
        "outlines-core has no batch call (loop of Guide.write_mask_into)."
    )

    print("\n## 4. JSON-schema feature coverage\n")
    print(
        "OK = compiles, valid instance accepted, violating instance rejected; "
        "'ignored' = compiles but the keyword is not enforced.\n"
    )
    rows, messages = [], []
    for name in FEATURES:
        row: list[Any] = [name]
        for lib in libs:
            r = get(lib, f"feature:{name}")
            bad = failure(r)
            if bad:
                row.append(bad.split(":")[0])
                messages.append([name, lib, bad])
            else:
                row.append(r["verdict"])
                if "message" in r:
                    messages.append([name, lib, r["message"]])
        rows.append(row)
    print(table(["feature"] + libs, rows))
    if messages:
        print("\nError messages (first line):\n")
        print(table(["feature", "library", "message"], messages))

    print("\n## 4b. Invalid schemas\n")
    rows = []
    for name in INVALID_SCHEMAS:
        for lib in libs:
            r = get(lib, f"invalid:{name}")
            bad = failure(r)
            rows.append(
                [
                    name,
                    lib,
                    bad.split(":")[0] if bad else r["verdict"],
                    bad or r.get("message"),
                ]
            )
    print(table(["schema", "library", "behaviour", "message (first line)"], rows))

    print("\n## 5. Memory (separate fresh process per library)\n")
    print(
        "heap = bytes allocated through malloc, measured with glibc mallinfo2(); RSS in MiB.\n"
    )
    rows = []
    for lib in libs:
        m = get(lib, "memory")
        bad = failure(m)
        if bad:
            rows.append([lib, bad, None, None, None, None, None])
            continue
        rows.append(
            [
                lib,
                m["setup_heap_mb"],
                m["setup_rss_mb"],
                m["compile_all_heap_mb"],
                m["compile_all_rss_mb"],
                m["per_matcher_kb"],
                m["peak_mb"],
            ]
        )
    print(
        table(
            [
                "library",
                "tokenizer info heap MiB",
                "tokenizer info RSS MiB",
                f"all {len(GRAMMARS)} grammars heap MiB",
                "all grammars RSS MiB",
                f"per matcher KiB (mean of {MATCHERS_FOR_MEMORY}, schema a)",
                "process peak RSS MiB",
            ],
            rows,
        )
    )
    print("\nHeap KiB per compiled grammar:\n")
    rows = [
        [name]
        + [get(lib, "memory").get("per_grammar_kb", {}).get(name) for lib in libs]
        for name in GRAMMARS
    ]
    print(table(["grammar"] + libs, rows))


def check_fixtures() -> str:
    """Confirm with the jsonschema package that each 'valid'/'invalid' instance really is."""
    try:
        import jsonschema
    except ImportError:
        return "fixtures not checked (jsonschema not installed)"
    validator_cls = jsonschema.Draft202012Validator
    checker = validator_cls.FORMAT_CHECKER
    wrong, unchecked = [], []
    cases = [(n, schema, ok, bad) for n, (schema, ok, bad) in FEATURES.items()]
    cases.append(("person", PERSON_SCHEMA, PERSON_INSTANCE, None))
    cases += [
        (n, spec, json.loads(sample), None)
        for n, (kind, spec, sample) in GRAMMARS.items()
        if kind == "schema"
    ]
    for name, schema, ok, bad in cases:
        validator = validator_cls(schema, format_checker=checker)
        if not validator.is_valid(ok):
            wrong.append(f"{name} (valid instance fails)")
        if bad is not None and validator.is_valid(bad):
            fmt = schema.get("format")
            (unchecked if fmt and fmt not in checker.checkers else wrong).append(name)
    text = "fixtures checked with jsonschema: " + (
        "all as labelled" if not wrong else "WRONG: " + ", ".join(wrong)
    )
    return text + (
        f" (not checkable here: {', '.join(unchecked)})" if unchecked else ""
    )


def versions(libs: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {sys.version.split()[0]}"]
    for pkg in ["torch", "transformers", "tokenizers", *libs]:
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return ", ".join(parts) + f"; {os.cpu_count()} CPUs; load average at start {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", default=DEFAULT_TOKENIZER, help="HF tokenizer folder"
    )
    parser.add_argument(
        "--libs",
        default=",".join(LIBS),
        help="comma-separated subset of " + ", ".join(LIBS),
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds allowed per task before kill",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--group", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run_tasks(Worker(args.worker, args.tokenizer), args.group, args.start)
        return

    started = time.perf_counter()
    libs = [lib.strip() for lib in args.libs.split(",") if lib.strip()]
    unknown = set(libs) - set(LIBS)
    if unknown:
        parser.error(f"unknown libraries: {', '.join(sorted(unknown))}")
    print(f"# Grammar library comparison\n\ntokenizer: {args.tokenizer}\n")
    print(f"{versions(libs)}\n\n{check_fixtures()}")
    results = {}
    for lib in libs:
        t0 = time.perf_counter()
        results[lib] = run_library(lib, args)
        print(f"\n({lib}: {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    report(results, libs)
    print(f"\nTotal run time: {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
