"""Incremental detokenization and stop-string matching on decoded text."""

from __future__ import annotations

# Prompt tokens kept as left context so the first generated token decodes with the right spacing.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one token at a time into text. A token that ends inside a multi-byte character
    yields "" and its bytes come out with the token that completes the character."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
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
