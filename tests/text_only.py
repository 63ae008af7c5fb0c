"""The engine client's text half (sagellm.engine.text.TextClient) alone, for tests of tokenizing:
the generation half is never called there."""

from __future__ import annotations

from sagellm.engine.text import TextClient


class TextOnly(TextClient):
    submit = abort = health = stats = shutdown = None
