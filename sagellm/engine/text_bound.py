"""How few tokens a text has at least, found without tokenizing it: so a prompt far over
MAX_INPUT_TOKENS is refused before the tokenizer spends seconds and a GB or more on it (an 8 MB
text took 5.8 s and 1.3 GB of peak RSS with the bundled tokenizer, offsets asked).

A token stands for at most as many characters as its longest vocabulary entry is long, provided
the tokenizer's pipeline drops no character on the way (no whitespace-splitting pre-tokenizer, no
fused unknown token, no added token that swallows the spaces around it); a normalizer may change
the length, so the text is measured after it. Where the pipeline allows no such bound, there is
none, and only PAYLOAD_LIMIT and the count after tokenizing apply."""

from __future__ import annotations

import json
import math

# Pre-tokenizers that split text without dropping any of it (Split and Punctuation unless their
# behavior is "Removed"); Whitespace, WhitespaceSplit, BertPreTokenizer and CharDelimiterSplit drop.
_KEEPING = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts"}


def _keeps_every_char(pre) -> bool:
    if pre is None:
        return True
    if pre.get("type") == "Sequence":
        return all(_keeps_every_char(p) for p in pre.get("pretokenizers") or [])
    return pre.get("type") in _KEEPING and pre.get("behavior") != "Removed"


def chars_per_token(tokenizer) -> int | None:
    """The most characters (after normalizing) one token can stand for, or None where the
    tokenizer gives no such bound (not a fast BPE tokenizer, or a pipeline that drops text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
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


class TokenFloor:
    """A tokenizer's chars_per_token, with the text measured after its normalizer."""

    def __init__(self, tokenizer):
        self.chars_per_token = chars_per_token(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._normalizer = backend.normalizer if backend is not None else None

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
