"""The chat template: where it comes from (env, file, tokenizer, model folder) and rendering it
into a prompt that carries exactly one BOS."""

from __future__ import annotations

import json
from pathlib import Path

from sagellm.errors import SettingsError, TemplateError
from sagellm.settings import Settings

SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
]


def find_template(settings: Settings, tokenizer, model_dir: str) -> tuple[str | None, str]:
    """(template, where it came from). The tokenizer covers tokenizer_config.json and
    chat_template.jinja; chat_template.json is read here for tokenizers that don't."""
    if settings.chat_template:
        return settings.chat_template, "CHAT_TEMPLATE"
    if settings.chat_template_file:
        path = Path(settings.chat_template_file)
        if not path.is_file():
            raise SettingsError(f"CHAT_TEMPLATE_FILE={path} does not exist")
        return path.read_text(), f"CHAT_TEMPLATE_FILE={path}"
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # several named templates: TGI and transformers use "default"
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    if tpl:
        return tpl, "tokenizer"
    for name in ("chat_template.jinja", "chat_template.json"):
        path = Path(model_dir) / name
        if path.is_file():
            text = path.read_text()
            return (json.loads(text)["chat_template"] if name.endswith(".json") else text), name
    return None, "none"


class ChatTemplate:
    def __init__(self, tokenizer, template: str | None, source: str,
                 default_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.template = template
        self.source = source
        self.default_kwargs = dict(default_kwargs or {})
        # Templates written for tool use loop over `tools` (and print assistant `tool_calls`).
        self.shows_tools = bool(template) and "tools" in template
        self.bos_id = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True).input_ids
        self._tokenizer_adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id

    def render(self, messages: list[dict], *, tools: list[dict] | None = None,
               add_generation_prompt: bool = True, continue_final_message: bool = False,
               kwargs: dict | None = None) -> str:
        if self.template is None:
            raise TemplateError("Template error: template not found (set CHAT_TEMPLATE or CHAT_TEMPLATE_FILE)")
        extra = {**self.default_kwargs, **(kwargs or {})}
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, **extra)
        except Exception as exc:  # jinja errors and raise_exception() from the template itself
            raise TemplateError(f"Template error: {exc}") from exc

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt: the template's own BOS, never a second one."""
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        if self.bos_id is not None and self._tokenizer_adds_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        while self.bos_id is not None and len(ids) > 1 and ids[0] == self.bos_id == ids[1]:
            ids = ids[1:]
        return ids

    def self_test(self) -> None:
        """Render a sample conversation at start-up, so a broken template fails there, not per request."""
        if self.template is not None:
            self.render(SAMPLE_CONVERSATION)
