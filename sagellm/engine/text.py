"""The text half of an EngineClient, the same whichever engine generates: a transformers
tokenizer, the chat template (sagellm.model.chat_template) and llguidance grammars compiled for
that tokenizer (sagellm.engine.constraint), all run in the API's threads."""

from __future__ import annotations

from sagellm.engine.client import CompiledGrammar, EngineClient, TokenSpan
from sagellm.engine.text_bound import TokenFloor
from sagellm.errors import ValidationError


class TextClient(EngineClient):
    """Engines subclass it and add the generation half (submit, abort, health, stats, shutdown)."""

    def __init__(self, tokenizer, chat, grammars=None):
        """chat: a sagellm.model.chat_template.ChatTemplate; grammars: a
        sagellm.engine.constraint.GrammarCompiler, or None when grammar support is off."""
        self.tokenizer = tokenizer
        self._chat = chat
        self._grammars = grammars
        self._floor = TokenFloor(tokenizer)

    def tokenize(self, text: str, add_special_tokens: bool = True, last: int | None = None) -> list[int]:
        if last is None:
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        start = self._floor.tail_start(text, last)
        return self.tokenizer(text[start:], add_special_tokens=add_special_tokens).input_ids[-last:]

    def tokens_over(self, text: str, limit: int) -> int | None:
        return self._floor.over(text, limit)

    def tokenize_with_offsets(self, text: str, last: int | None = None) -> list[TokenSpan]:
        start = self._floor.tail_start(text, last) if last is not None else 0
        enc = self.tokenizer(text[start:], add_special_tokens=True, return_offsets_mapping=True)
        spans = [TokenSpan(i, s, e) for i, (s, e) in zip(enc.input_ids, enc["offset_mapping"])]
        if start:  # offsets into the tail, moved into the text; not the (0, 0) of the special tokens
            # the post-processor adds (sequence id None), which are (0, 0) in the whole text's too
            spans = [t if seq is None else TokenSpan(t.token_id, t.start + start, t.end + start)
                     for t, seq in zip(spans, enc.sequence_ids())]
        return spans if last is None else spans[-last:]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @property
    def template_shows_tools(self) -> bool:
        return self._chat.shows_tools

    def render_chat(self, messages: list[dict], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    kwargs: dict | None = None) -> str:
        return self._chat.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                 continue_final_message=continue_final_message, kwargs=kwargs)

    def encode_chat(self, prompt: str) -> list[int]:
        return self._chat.encode(prompt)

    @property
    def supports_grammar(self) -> bool:
        return self._grammars is not None

    def compile_grammar(self, kind: str, value: object, param: str) -> CompiledGrammar:
        if self._grammars is None:
            raise ValidationError(f"`{param}`: grammar is not supported (DISABLE_GRAMMAR_SUPPORT is set)",
                                  param=param)
        return self._grammars.compile(kind, value, param)
