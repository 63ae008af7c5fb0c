"""Settings.from_env: defaults, aliases, lenient parsing, loud failures, describe() and the README table."""

from __future__ import annotations

import dataclasses

import pytest

from sagellm.errors import SettingsError
from sagellm.settings import VARS, Settings, markdown_table

# One valid raw value per field and what it parses to; every alias is tried with it.
SAMPLES = {
    "engine": ("VLLM", "vllm"),
    "model_id": ("org/model", "org/model"),
    "revision": ("main", "main"),
    "hf_token": ("hf_abcdefghijkl", "hf_abcdefghijkl"),
    "trust_remote_code": ("true", True),
    "quantize": ("AWQ", "awq"),
    "dtype": ("bf16", "bfloat16"),
    "num_shard": ("2", 2),
    "model_dir": ("/models/x", "/models/x"),
    "cache_dir": ("/tmp/cache", "/tmp/cache"),
    "max_input_tokens": ("100", 100),
    "max_total_tokens": ("200", 200),
    "max_batch_prefill_tokens": ("300", 300),
    "max_batch_total_tokens": ("4000", 4000),
    "max_batch_size": ("8", 8),
    "prefix_caching": ("false", False),
    "cpu_kernels": ("0", False),
    "batch_invariant": ("true", True),
    "max_concurrent_requests": ("32", 32),
    "max_stop_sequences": ("0", 0),
    "max_top_n_tokens": ("5", 5),
    "max_best_of": ("3", 3),
    "max_choices": ("4", 4),
    "disable_grammar_support": ("true", True),
    "grammar_compile_timeout_s": ("2.5", 2.5),
    "max_client_batch_size": ("7", 7),
    "payload_limit": ("1000", 1000),
    "messages_api_enabled": ("false", False),
    "port": ("9000", 9000),
    "bind_host": ("127.0.0.1", "127.0.0.1"),
    "served_model_name": ("tgi", "tgi"),
    "chat_template": ("{{ messages }}", "{{ messages }}"),
    "chat_template_file": ("/t.jinja", "/t.jinja"),
    "chat_template_kwargs": ('{"enable_thinking": false}', {"enable_thinking": False}),
    "default_max_tokens": ("64", 64),
    "request_timeout_s": ("2.5", 2.5),
    "return_full_text": ("false", False),
    "api_key": ("secret-key-123", "secret-key-123"),
    "responses_store_size": ("0", 0),
    "responses_store_ttl_s": ("60", 60.0),
    "cuda_memory_fraction": ("0.5", 0.5),
    "kv_cache_memory_mb": ("512", 512),
    "graceful_termination_timeout": ("0", 0.0),
    "log_level": ("DEBUG", "debug"),
    "log_prompts": ("yes", True),
    "compute_type": ("gpu+optimized", "gpu+optimized"),
    "watchdog_timeout_s": ("10", 10.0),
    "worker_threads": ("16", 16),
    "lora_adapters": ("a=/x/a", (("a", "/x/a"),)),
    "max_loras": ("3", 3),
    "max_lora_rank": ("32", 32),
}

ALIASES = [(var.field, name) for var in VARS for name in var.names]


def test_table_covers_every_field():
    env_fields = {f.name for f in dataclasses.fields(Settings)} - {"hf_token_source", "sources", "vllm_flags"}
    assert [var.field for var in VARS] == [f for f in SAMPLES]
    assert {var.field for var in VARS} == env_fields


def test_defaults_from_empty_mapping():
    s = Settings.from_env({})
    assert s == Settings()
    assert s.model_id is None and s.hf_token is None and s.hf_token_source is None
    assert s.trust_remote_code is False
    assert s.num_shard == 1
    assert s.model_dir == "/opt/ml/model"
    assert s.max_concurrent_requests == 128
    assert s.max_stop_sequences == 16
    assert s.max_top_n_tokens == 20
    assert s.max_best_of == 2
    assert s.max_client_batch_size == 4
    assert s.payload_limit == 8_000_000
    assert s.messages_api_enabled is None
    assert s.port == 8080
    assert s.bind_host == "0.0.0.0"
    assert dict(s.chat_template_kwargs) == {}
    assert s.return_full_text is True
    assert s.cuda_memory_fraction == 0.9
    assert s.graceful_termination_timeout == 25.0
    assert s.log_level == "info"
    assert s.watchdog_timeout_s == 60.0


def test_from_env_none_reads_os_environ(monkeypatch):
    monkeypatch.setenv("SM_NUM_GPUS", "3")
    assert Settings.from_env().num_shard == 3


def test_hostname_is_not_the_bind_host():
    assert Settings.from_env({"HOSTNAME": "ip-10-0-0-1"}).bind_host == "0.0.0.0"


@pytest.mark.parametrize("field,name", ALIASES)
def test_every_alias(field, name):
    raw, expected = SAMPLES[field]
    s = Settings.from_env({name: raw})
    assert getattr(s, field) == expected
    assert s.sources[field] == name


@pytest.mark.parametrize("name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN"])
def test_hf_token_source(name):
    assert Settings.from_env({name: "hf_abcdefgh"}).hf_token_source == name


def test_first_alias_wins_when_they_agree():
    s = Settings.from_env({"HF_API_TOKEN": "hf_same", "HF_TOKEN": "hf_same"})
    assert s.hf_token_source == "HF_TOKEN"
    # Equal once parsed counts as agreeing.
    s = Settings.from_env({"SM_NUM_GPUS": "2", "NUM_SHARD": '"2.0"'})
    assert s.num_shard == 2 and s.sources["num_shard"] == "SM_NUM_GPUS"


@pytest.mark.parametrize(
    "env,field,expected",
    [
        ({"HF_MODEL_TRUST_REMOTE_CODE": "True"}, "trust_remote_code", True),
        ({"HF_MODEL_TRUST_REMOTE_CODE": '"true"'}, "trust_remote_code", True),
        ({"HF_MODEL_TRUST_REMOTE_CODE": "1"}, "trust_remote_code", True),
        ({"HF_MODEL_TRUST_REMOTE_CODE": " FALSE "}, "trust_remote_code", False),
        ({"MESSAGES_API_ENABLED": "'off'"}, "messages_api_enabled", False),
        ({"SM_NUM_GPUS": '"4"'}, "num_shard", 4),
        ({"SM_NUM_GPUS": "'4'"}, "num_shard", 4),
        ({"SM_NUM_GPUS": " 4 "}, "num_shard", 4),
        ({"SM_NUM_GPUS": "4.0"}, "num_shard", 4),
        ({"MAX_TOTAL_TOKENS": '"4096"'}, "max_total_tokens", 4096),
        ({"HF_MODEL_ID": '"org/abc"'}, "model_id", "org/abc"),
        ({"HF_MODEL_ID": "'org/abc'"}, "model_id", "org/abc"),
        ({"CUDA_MEMORY_FRACTION": '"0.8"'}, "cuda_memory_fraction", 0.8),
        ({"CUDA_MEMORY_FRACTION": "1"}, "cuda_memory_fraction", 1.0),
        ({"HF_MODEL_QUANTIZE": '"bitsandbytes-nf4"'}, "quantize", "bitsandbytes-nf4"),
        ({"DTYPE": "half"}, "dtype", "float16"),
        ({"DTYPE": "fp32"}, "dtype", "float32"),
        ({"DTYPE": "float"}, "dtype", "float32"),
        ({"DTYPE": "BFloat16"}, "dtype", "bfloat16"),
        ({"DTYPE": "auto"}, "dtype", None),
        ({"LOG_LEVEL": "warn"}, "log_level", "warning"),
        ({"TENSOR_PARALLEL_DEGREE": "max"}, "num_shard", -1),
        ({"TENSOR_PARALLEL_DEGREE": '"MAX"'}, "num_shard", -1),
        # A JSON-encoded template keeps its escaped newline.
        ({"CHAT_TEMPLATE": '"a\\nb"'}, "chat_template", "a\nb"),
        # Only one layer of quotes comes off.
        ({"HF_MODEL_ID": "'\"abc\"'"}, "model_id", '"abc"'),
        ({"CHAT_TEMPLATE_KWARGS": "{'a': 1}"}, "chat_template_kwargs", {"a": 1}),
        ({"CHAT_TEMPLATE_KWARGS": '"{\\"a\\": 1}"'}, "chat_template_kwargs", {"a": 1}),
    ],
)
def test_lenient_values(env, field, expected):
    assert getattr(Settings.from_env(env), field) == expected


@pytest.mark.parametrize("empty", ["", "  ", '""', "''"])
def test_empty_counts_as_unset(empty):
    s = Settings.from_env({"HF_MODEL_ID": empty, "SM_NUM_GPUS": empty, "MESSAGES_API_ENABLED": empty})
    assert s.model_id is None and s.num_shard == 1 and s.messages_api_enabled is None
    assert s.sources == {}
    # An empty alias neither wins nor conflicts.
    assert Settings.from_env({"HF_MODEL_ID": empty, "MODEL_ID": "org/x"}).model_id == "org/x"


@pytest.mark.parametrize(
    "name,raw,expected",
    [
        ("SM_NUM_GPUS", "abc", "positive integer"),
        ("SM_NUM_GPUS", "0", "positive integer"),
        ("NUM_SHARD", "4.5", "positive integer"),
        ("MAX_TOTAL_TOKENS", "-5", "positive integer"),
        ("MAX_INPUT_LENGTH", "1e", "positive integer"),
        ("MAX_STOP_SEQUENCES", "-1", "non-negative integer"),
        ("MAX_TOP_N_TOKENS", "nan", "non-negative integer"),
        ("PAYLOAD_LIMIT", "inf", "positive integer"),
        ("MESSAGES_API_ENABLED", "maybe", "boolean"),
        ("HF_MODEL_TRUST_REMOTE_CODE", "2", "boolean"),
        ("PORT", "70000", "port number"),
        ("SAGEMAKER_BIND_TO_PORT", "0", "port number"),
        ("HF_MODEL_QUANTIZE", "int3", "bitsandbytes-nf4"),
        ("DTYPE", "int8", "bfloat16"),
        ("LOG_LEVEL", "loud", "warning"),
        ("CUDA_MEMORY_FRACTION", "1.5", "at most 1"),
        ("CUDA_MEMORY_FRACTION", "0", "above 0"),
        ("REQUEST_TIMEOUT_S", "-1", "positive number"),
        ("WATCHDOG_TIMEOUT_S", "soon", "positive number"),
        ("GRACEFUL_TERMINATION_TIMEOUT", "-0.5", "non-negative number"),
        ("CHAT_TEMPLATE_KWARGS", "[1, 2]", "JSON object"),
        ("CHAT_TEMPLATE_KWARGS", "{nope", "JSON object"),
        ("TENSOR_PARALLEL_DEGREE", "most", "'max'"),
    ],
)
def test_nonsense_names_variable_value_and_expectation(name, raw, expected):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: raw})
    message = str(info.value)
    assert message.startswith(f"{name}={raw!r} is not")
    assert expected in message


def test_error_message_example():
    with pytest.raises(SettingsError, match=r"^SM_NUM_GPUS='abc' is not a positive integer"):
        Settings.from_env({"SM_NUM_GPUS": "abc"})


@pytest.mark.parametrize(
    "env,names",
    [
        ({"MAX_INPUT_TOKENS": "100", "MAX_INPUT_LENGTH": "200"}, ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH")),
        ({"HF_MODEL_ID": "a/b", "MODEL_ID": "c/d"}, ("HF_MODEL_ID", "MODEL_ID")),
        ({"SM_NUM_GPUS": "2", "TENSOR_PARALLEL_DEGREE": "max"}, ("SM_NUM_GPUS", "TENSOR_PARALLEL_DEGREE")),
        ({"MESSAGES_API_ENABLED": "true", "OAI_ENABLED": "false"}, ("MESSAGES_API_ENABLED", "OAI_ENABLED")),
    ],
)
def test_conflicting_aliases(env, names):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert all(name in str(info.value) for name in names)


def test_conflicting_tokens_do_not_leak():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"HF_TOKEN": "hf_first_secret", "HUGGING_FACE_HUB_TOKEN": "hf_second_secret"})
    message = str(info.value)
    assert "HF_TOKEN" in message and "HUGGING_FACE_HUB_TOKEN" in message
    assert "secret" not in message


def test_describe_masks_secrets_and_names_sources():
    env = {"HF_API_TOKEN": "hf_abcdefghijklmnop", "API_KEY": "sk-verysecretvalue", "PORT": "9000"}
    s = Settings.from_env(env)
    text = "\n".join(s.describe())
    assert "hf_abcdefghijklmnop" not in text and "sk-verysecretvalue" not in text
    # Not one character of a secret: a prefix narrows the search for the rest.
    assert "hf_token=*** (from HF_API_TOKEN)" in s.describe()
    assert "api_key=*** (from API_KEY)" in s.describe()
    assert "hf_a" not in text and "sk-v" not in text
    assert "port=9000 (from PORT)" in s.describe()
    assert "max_concurrent_requests=128 (default)" in s.describe()
    assert "model_id=(unset) (default)" in s.describe()
    assert len(s.describe()) == len(VARS)


def test_repr_never_shows_secrets():
    s = Settings.from_env({"HF_TOKEN": "hf_abcdefghijklmnop", "API_KEY": "sk-verysecretvalue"})
    assert "hf_abcdefghijklmnop" not in repr(s) and "sk-verysecretvalue" not in repr(s)


def test_describe_hides_short_secrets_entirely():
    lines = Settings.from_env({"API_KEY": "abcd"}).describe()
    assert "api_key=*** (from API_KEY)" in lines
    assert not any("abcd" in line for line in lines)


def test_describe_keeps_one_line_per_setting():
    s = Settings.from_env({"CHAT_TEMPLATE": "{% for m in messages %}\n{{ m.content }}\n{% endfor %}" * 5,
                           "TENSOR_PARALLEL_DEGREE": "max"})
    assert all("\n" not in line for line in s.describe())
    assert "num_shard=max (from TENSOR_PARALLEL_DEGREE)" in s.describe()


def test_markdown_table_mentions_every_name():
    table = markdown_table()
    for var in VARS:
        for name in var.names:
            assert f"`{name}`" in table
        assert var.meaning.replace("|", "\\|") in table
    assert table.count("\n") == len(VARS) + 2
    assert "`8080`" in table and "`true`" in table


def test_max_input_must_be_below_max_total():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"MAX_INPUT_LENGTH": "4096", "MAX_TOTAL_TOKENS": "4096"})
    message = str(info.value)
    assert "MAX_INPUT_LENGTH=4096" in message and "MAX_TOTAL_TOKENS=4096" in message
    s = Settings.from_env({"MAX_INPUT_TOKENS": "4095", "MAX_TOTAL_TOKENS": "4096"})
    assert (s.max_input_tokens, s.max_total_tokens) == (4095, 4096)


def test_batch_total_must_hold_one_request():
    with pytest.raises(SettingsError, match="MAX_BATCH_TOTAL_TOKENS=1000.*MAX_TOTAL_TOKENS=2000"):
        Settings.from_env({"MAX_BATCH_TOTAL_TOKENS": "1000", "MAX_TOTAL_TOKENS": "2000"})
    s = Settings.from_env({"MAX_BATCH_TOTAL_TOKENS": "2000", "MAX_TOTAL_TOKENS": "2000"})
    assert s.max_batch_total_tokens == 2000


def test_replace_checks_combinations_too():
    s = Settings().replace(max_total_tokens=100)
    assert s.max_total_tokens == 100
    with pytest.raises(SettingsError, match="MAX_INPUT_TOKENS=100"):
        s.replace(max_input_tokens=100)


def test_settings_are_frozen_and_kwargs_read_only():
    s = Settings.from_env({"CHAT_TEMPLATE_KWARGS": '{"enable_thinking": false}'})
    assert s.chat_template_kwargs["enable_thinking"] is False
    assert dict(s.chat_template_kwargs) == {"enable_thinking": False}
    with pytest.raises(TypeError):
        s.chat_template_kwargs["x"] = 1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    # Plain dicts given to the constructor are wrapped as well.
    with pytest.raises(TypeError):
        Settings(chat_template_kwargs={"a": 1}).chat_template_kwargs["b"] = 2  # type: ignore[index]


def test_lora_adapters_as_tgi_spells_them():
    s = Settings.from_env({"LORA_ADAPTERS": "support=/opt/adapters/s1, /data/fin-v2/ ,org/sql-lora", "MAX_LORAS": "2"})
    assert s.lora_adapters == (("support", "/opt/adapters/s1"), ("fin-v2", "/data/fin-v2/"),
                               ("org/sql-lora", "org/sql-lora"))
    assert (s.max_loras, s.max_lora_rank) == (2, 64)
    for bad in ("a=", "=/x", "a=/x,a=/y", ","):
        with pytest.raises(SettingsError) as info:
            Settings.from_env({"LORA_ADAPTERS": bad})
        assert "LORA_ADAPTERS" in info.value.message
