"""Model resolution, chat templates and limits, on the bundled model's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from sagellm.errors import ModelLoadError, SettingsError, TemplateError
from sagellm.model.bundled import bundled_model_dir
from sagellm.model.chat_template import ChatTemplate, find_template
from sagellm.engine.limits import derive_limits
from sagellm.model.resolve import resolve_model
from sagellm.settings import Settings

MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def bundled() -> Path:
    return bundled_model_dir()


@pytest.fixture
def no_template_copy(bundled, tmp_path) -> Path:
    """The bundled model's tokenizer files without any chat template."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled / name, tmp_path / name)
    return tmp_path


def test_resolution_order(bundled, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_model(Settings(model_dir=str(empty))).kind == "bundled"
    assert resolve_model(Settings(model_dir=str(bundled))).kind == "sagemaker"  # /opt/ml/model holds weights
    local = resolve_model(Settings(model_id=str(bundled), model_dir=str(empty)))
    assert (local.kind, local.path) == ("local", str(bundled))


def test_unusable_model_ids_fail_with_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model(Settings(model_id=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="neither an existing folder"):
        resolve_model(Settings(model_id="/no/such/folder"))
    # HF_HUB_OFFLINE=1 here: a hub id can't be fetched, and the message says which one.
    with pytest.raises(ModelLoadError, match="could not fetch HF_MODEL_ID=acme/not-a-model"):
        resolve_model(Settings(model_id="acme/not-a-model"))


def test_template_sources_in_priority_order(bundled, no_template_copy, tmp_path):
    tok = AutoTokenizer.from_pretrained(bundled)
    assert find_template(Settings(), tok, str(bundled))[1] == "tokenizer"
    assert find_template(Settings(chat_template="{{ 'x' }}"), tok, str(bundled)) == ("{{ 'x' }}", "CHAT_TEMPLATE")
    f = tmp_path / "t.jinja"
    f.write_text("{{ 'from file' }}")
    assert find_template(Settings(chat_template_file=str(f)), tok, str(bundled))[0] == "{{ 'from file' }}"
    with pytest.raises(SettingsError, match="CHAT_TEMPLATE_FILE"):
        find_template(Settings(chat_template_file=str(tmp_path / "missing")), tok, str(bundled))

    bare = AutoTokenizer.from_pretrained(no_template_copy)
    assert find_template(Settings(), bare, str(no_template_copy)) == (None, "none")
    (no_template_copy / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'json' }}"}))
    assert find_template(Settings(), bare, str(no_template_copy)) == ("{{ 'json' }}", "chat_template.json")


def test_missing_template_is_a_422_template_error(no_template_copy):
    tok = AutoTokenizer.from_pretrained(no_template_copy)
    with pytest.raises(TemplateError, match="template not found"):
        ChatTemplate(tok, None, "none").render(MESSAGES)


def test_template_exceptions_become_template_errors(bundled):
    tok = AutoTokenizer.from_pretrained(bundled)
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
    with pytest.raises(TemplateError, match="a system message must come first"):
        ChatTemplate(tok, strict, "CHAT_TEMPLATE").render(MESSAGES)


def test_rendered_prompt_has_exactly_one_bos(bundled):
    tok = AutoTokenizer.from_pretrained(bundled)
    tpl, _ = find_template(Settings(), tok, str(bundled))
    chat = ChatTemplate(tok, tpl, "tokenizer")
    ids = chat.encode(chat.render(MESSAGES))
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    # A template that writes BOS itself, for a tokenizer that would add one too, still gives one.
    doubled = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat2 = ChatTemplate(tok, doubled, "CHAT_TEMPLATE")
    chat2._tokenizer_adds_bos = True
    ids2 = chat2.encode(chat2.render(MESSAGES))
    assert ids2[0] == tok.bos_token_id and ids2[1] != tok.bos_token_id


def test_chat_template_kwargs_reach_the_template(bundled):
    tok = AutoTokenizer.from_pretrained(bundled)
    tpl = "{% if enable_thinking %}<think>{% endif %}{{ messages[0]['content'] }}"
    chat = ChatTemplate(tok, tpl, "CHAT_TEMPLATE", default_kwargs={"enable_thinking": True})
    assert chat.render(MESSAGES, add_generation_prompt=False).startswith("<think>")
    assert chat.render(MESSAGES, kwargs={"enable_thinking": False}) == "Hello"


def test_limits_are_derived_and_checked(bundled):
    config = AutoConfig.from_pretrained(bundled)  # max_position_embeddings = 8192
    lim = derive_limits(Settings(), config, "cpu", torch.float32)
    assert lim.max_total_tokens == 8192 and lim.max_input_tokens == 8191
    lim = derive_limits(Settings(max_input_tokens=1000), config, "cpu", torch.float32)
    assert lim.max_input_tokens == 1000 and lim.max_total_tokens > 1000
    with pytest.raises(SettingsError, match="MAX_TOTAL_TOKENS=9000 exceeds"):
        derive_limits(Settings(max_total_tokens=9000), config, "cpu", torch.float32)
    with pytest.raises(SettingsError, match="KV cache holds 22 tokens.*MAX_TOTAL_TOKENS=2048"):
        # 1 MiB / (30 layers * 3 KV heads * 64 * 2 * 4 bytes) = 22 tokens
        derive_limits(Settings(kv_cache_memory_mb=1, max_total_tokens=2048), config, "cpu",
                      torch.float32)
