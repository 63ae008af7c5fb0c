"""One small adapter per grammar library (llguidance, xgrammar, outlines-core), same interface."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from grammar_bench.fixtures import CompileError


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
