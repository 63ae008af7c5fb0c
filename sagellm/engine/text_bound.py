"""How few tokens a text has at least, found without tokenizing it: so a prompt far over
MAX_INPUT_TOKENS is refused before the tokenizer spends seconds and a GB or more on it (an 8 MB
text took 5.8 s and 1.3 GB of peak RSS with the bundled tokenizer, offsets asked).

A token stands for at most as many characters as its longest vocabulary entry is long, provided
the tokenizer's pipeline drops no character on the way (no whitespace-splitting pre-tokenizer, no
fused unknown token, no added token that swallows the spaces around it); a normalizer may change
the length, so the text is measured after it. Where the pipeline allows no such bound, there is
none, and only PAYLOAD_LIMIT and the count after tokenizing apply.

The same bound finds, for TGI's `truncate` (keep the last N tokens), a tail of the text that holds
at least N tokens and ends in the same tokens as the whole, so only that tail is tokenized.
"""

from __future__ import annotations

import json
import math
import re

# Pre-tokenizers that split text without dropping any of it (Split and Punctuation unless their
# behavior is "Removed"); Whitespace, WhitespaceSplit, BertPreTokenizer and CharDelimiterSplit drop.
_KEEPING = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts"}


def _keeps_every_char(pre) -> bool:
    if pre is None:
        return True
    if pre.get("type") == "Sequence":
        return all(_keeps_every_char(p) for p in pre.get("pretokenizers") or [])
    return pre.get("type") in _KEEPING and pre.get("behavior") != "Removed"


def _spec(tokenizer) -> dict | None:
    """The fast tokenizer's pipeline as its JSON, or None without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def chars_per_token(tokenizer, spec: dict | None = None) -> int | None:
    """The most characters (after normalizing) one token can stand for, or None where the
    tokenizer gives no such bound (not a fast BPE tokenizer, or a pipeline that drops text)."""
    spec = spec or _spec(tokenizer)
    if spec is None:
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _keeps_every_char(spec.get("pre_tokenizer")):
        return None
    # One unknown token for a whole run of unknown characters: unbounded.
    if model.get("unk_token") is not None and model.get("fuse_unk") and not model.get("byte_fallback"):
        return None
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") for a in added):  # swallows any run of spaces next to it
        return None
    # Entries are at least as long as what they cover: a byte-level entry has a character per
    # byte, a byte-fallback one ("<0x41>") six for one byte, a continuing prefix ("##") adds.
    longest = max((len(k) for k in model.get("vocab") or {}), default=0)
    return max([longest] + [len(a.get("content") or "") for a in added]) or None


# Where a tail may start: a space after a word character. ByteLevel's split (GPT-2's pattern,
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) matches every character,
# never puts a non-space and a space after it in one piece (a space only leads a piece or sits in a
# run of spaces) and looks ahead, never behind; Digits splits at digits alone. So however far back
# the text starts, a piece starts at such a space, and the pieces from there on, each tokenized
# alone by BPE, are the same: the tail's tokens are the whole's last ones.
_TAIL_CUT = re.compile(r"\w ")


def _tail_exact(spec: dict) -> bool:
    """Whether a tail cut at _TAIL_CUT tokenizes as the whole text ends: no normalizer (it may join
    or move characters across the cut), only ByteLevel's GPT-2 split (no prefix space: it would add
    one to the tail) and Digits, no added token holding a non-space before a space (it would match
    across the cut) or matched as a single word (it looks behind), no truncation or padding."""
    pre = spec.get("pre_tokenizer") or {}
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if (len(byte_level) != 1 or any(p.get("type") not in ("ByteLevel", "Digits") for p in parts)
            or not byte_level[0].get("use_regex", True) or byte_level[0].get("add_prefix_space")):
        return False
    added = spec.get("added_tokens") or []
    if any(re.search(r"\S\s", a.get("content") or "") or a.get("single_word") for a in added):
        return False
    return spec.get("normalizer") is None and spec.get("truncation") is None and spec.get("padding") is None


class TokenFloor:
    """A tokenizer's chars_per_token, with the text measured after its normalizer."""

    def __init__(self, tokenizer):
        spec = _spec(tokenizer)
        self.chars_per_token = chars_per_token(tokenizer, spec)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._normalizer = backend.normalizer if backend is not None else None
        self._tail_exact = self.chars_per_token is not None and _tail_exact(spec)

    def over(self, text: str, limit: int) -> int | None:
        """A number of tokens `text` has at least, when that is more than `limit`; else None.
        Cheap: a length, and at most one pass of the normalizer, never a tokenization."""
        c = self.chars_per_token
        if c is None:
            return None
        n = len(text)
        if n <= limit * c:  # (a normalizer that lengthens it is left to the count after tokenizing)
            return None
        if self._normalizer is not None:
            n = len(self._normalizer.normalize_str(text))
        fewest = math.ceil(n / c)
        return fewest if fewest > limit else None

    def tail_start(self, text: str, num_tokens: int) -> int:
        """Where a tail of `text` starts whose tokens are the whole text's last ones and number at
        least `num_tokens` (the tail has at least num_tokens * chars_per_token characters); 0 (the
        whole text) where the tokenizer allows no exact cut or the text has none far enough back."""
        if not self._tail_exact:
            return 0
        end = len(text) - num_tokens * self.chars_per_token  # a cut at or before it
        window = 4096
        while end > 0:
            lo = max(0, end - window)
            cuts = [m.start() + 1 for m in _TAIL_CUT.finditer(text, lo, end + 1)]  # the space's index
            if cuts:
                return cuts[-1]
            if lo == 0:
                break
            window *= 4
        return 0
