"""Incremental detokenization and stop-string matching on decoded text."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

# Prompt tokens kept as left context so the first generated token decodes with the right spacing.
_CONTEXT_TOKENS = 5


def make_detokenizer(tokenizer, prompt_ids: list[int]) -> StreamDetokenizer | WindowDetokenizer:
    """Turns one token at a time into text (special tokens kept). A token that ends inside a
    multi-byte character yields "" and its bytes come out with the token that completes it.

    tokenizers' own DecodeStream where the tokenizer has a Rust backend (every fast tokenizer):
    measured with bench/detokenize.py on SmolLM2's tokenizer, 0.6 us a token against 4.7-5.1 us
    for the window decode (two tokenizer.decode calls a token), with the same pieces for English,
    code and multi-byte text. The window decode stays for tokenizers without that backend."""
    context = list(prompt_ids[-_CONTEXT_TOKENS:])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return StreamDetokenizer(backend, context) if backend is not None else WindowDetokenizer(tokenizer, context)


class StreamDetokenizer:
    def __init__(self, backend, context_ids: list[int]):
        self._backend = backend  # a tokenizers.Tokenizer
        self._stream = DecodeStream(ids=context_ids, skip_special_tokens=False)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


class WindowDetokenizer:
    """Decodes the window of tokens since the last complete text, with and without the new token."""

    def __init__(self, tokenizer, context_ids: list[int]):
        self._tokenizer = tokenizer
        self._ids = list(context_ids)
        self._prefix = 0
        self._read = len(self._ids)

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read], skip_special_tokens=False)
        full_text = decode(self._ids[self._prefix:], skip_special_tokens=False)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        # Keep only the window still needed: drop ids before the new prefix.
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        return full_text[len(prefix_text):]


class StopMatcher:
    """Finds stop strings anywhere in the generated text (not only at token boundaries) and
    withholds the tail that could still grow into a match, so streamed text never has to be
    taken back."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._emitted = 0

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Add text; return (text now safe to emit, the stop string matched or None).
        On a match the returned text ends right before the stop string."""
        if not self._stops:
            return piece, None
        search_from = max(self._emitted, len(self._text) - self._longest + 1)
        self._text += piece
        best_pos, best_stop = -1, None
        for stop in self._stops:
            pos = self._text.find(stop, search_from)
            if pos != -1 and (best_pos == -1 or pos < best_pos):
                best_pos, best_stop = pos, stop
        if best_stop is not None:
            out = self._text[self._emitted:best_pos]
            self._text = self._text[:best_pos]
            self._emitted = best_pos
            return out, best_stop
        safe_end = len(self._text) - self._held_back()
        out = self._text[self._emitted:safe_end]
        self._emitted = safe_end
        return out, None

    def flush(self) -> str:
        """The withheld tail, released when generation ends for another reason."""
        out = self._text[self._emitted:]
        self._emitted = len(self._text)
        return out

    def _held_back(self) -> int:
        pending = len(self._text) - self._emitted
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, pending), hold, -1):
                if self._text.endswith(stop[:k]):
                    hold = k
                    break
        return hold
