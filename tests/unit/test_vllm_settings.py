"""ENGINE and the migration names (AWS's vLLM container: SM_VLLM_<FLAG>; LMI: OPTION_<ARG>): which
of our settings they set, what passes through to vLLM, contradictions, unhonoured warnings, and
the engine choice."""

from __future__ import annotations

import pytest

from sagellm.engine import choice
from sagellm.errors import ModelLoadError, SettingsError
from sagellm.settings import Settings


@pytest.mark.parametrize("env,field,expected", [
    ({"SM_VLLM_MAX_MODEL_LEN": "2048"}, "max_total_tokens", 2048),
    ({"OPTION_MAX_MODEL_LEN": "2048"}, "max_total_tokens", 2048),
    ({"SM_VLLM_MAX_NUM_SEQS": "32"}, "max_batch_size", 32),
    ({"OPTION_MAX_ROLLING_BATCH_SIZE": "64"}, "max_batch_size", 64),
    ({"SM_VLLM_MAX_NUM_BATCHED_TOKENS": "4096"}, "max_batch_prefill_tokens", 4096),
    ({"OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS": "4096"}, "max_batch_prefill_tokens", 4096),
    ({"SM_VLLM_GPU_MEMORY_UTILIZATION": "0.8"}, "cuda_memory_fraction", 0.8),
    ({"OPTION_GPU_MEMORY_UTILIZATION": "0.8"}, "cuda_memory_fraction", 0.8),
    ({"SM_VLLM_TENSOR_PARALLEL_SIZE": "2"}, "num_shard", 2),
    ({"OPTION_TENSOR_PARALLEL_DEGREE": "max"}, "num_shard", -1),
    ({"OPTION_DTYPE": "fp16"}, "dtype", "float16"),
    ({"SM_VLLM_DTYPE": "bfloat16"}, "dtype", "bfloat16"),
    ({"OPTION_TRUST_REMOTE_CODE": "true"}, "trust_remote_code", True),
    ({"SM_VLLM_MODEL": "org/model"}, "model_id", "org/model"),
    ({"OPTION_MODEL_ID": "org/model"}, "model_id", "org/model"),
    ({"OPTION_REVISION": "abc123"}, "revision", "abc123"),
    ({"SM_VLLM_QUANTIZATION": "awq_marlin"}, "quantize", "awq_marlin"),
    ({"OPTION_QUANTIZE": "fp8"}, "quantize", "fp8"),
    ({"SM_VLLM_ENABLE_PREFIX_CACHING": "false"}, "prefix_caching", False),
    # AWS's container turns an empty SM_VLLM_X into the bare flag `--x`: on.
    ({"SM_VLLM_TRUST_REMOTE_CODE": ""}, "trust_remote_code", True),
    ({"SM_VLLM_MAX_LOGPROBS": "5"}, "max_top_n_tokens", 5),
    ({"SM_VLLM_SERVED_MODEL_NAME": "mine"}, "served_model_name", "mine"),
])
def test_migration_names_set_our_settings(env, field, expected):
    s = Settings.from_env(env)
    assert getattr(s, field) == expected
    assert s.sources[field] == next(iter(env))
    assert dict(s.vllm_flags) == {}


def test_an_empty_value_is_still_unset_outside_sm_vllm():
    assert Settings.from_env({"OPTION_TRUST_REMOTE_CODE": ""}).trust_remote_code is False
    assert Settings.from_env({"HF_MODEL_TRUST_REMOTE_CODE": ""}).trust_remote_code is False


@pytest.mark.parametrize("env,names", [
    ({"MAX_TOTAL_TOKENS": "2048", "SM_VLLM_MAX_MODEL_LEN": "4096"}, ("MAX_TOTAL_TOKENS", "SM_VLLM_MAX_MODEL_LEN")),
    ({"MAX_BATCH_SIZE": "8", "OPTION_MAX_ROLLING_BATCH_SIZE": "16"}, ("MAX_BATCH_SIZE", "OPTION_MAX_ROLLING_BATCH_SIZE")),
    ({"SM_NUM_GPUS": "2", "OPTION_TENSOR_PARALLEL_DEGREE": "4"}, ("SM_NUM_GPUS", "OPTION_TENSOR_PARALLEL_DEGREE")),
    ({"SM_VLLM_MAX_LORAS": "4", "OPTION_MAX_LORAS": "8"}, ("SM_VLLM_MAX_LORAS", "OPTION_MAX_LORAS")),
    ({"OPTION_CPU_OFFLOAD_GB": "4", "OPTION_CPU_OFFLOAD_GB_PER_GPU": "8"},
     ("OPTION_CPU_OFFLOAD_GB", "OPTION_CPU_OFFLOAD_GB_PER_GPU")),
])
def test_a_contradiction_stops_start_up_with_one_line(env, names):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in names)


def test_agreeing_names_are_fine():
    s = Settings.from_env({"MAX_TOTAL_TOKENS": "2048", "SM_VLLM_MAX_MODEL_LEN": "2048", "OPTION_MAX_MODEL_LEN": '"2048"'})
    assert s.max_total_tokens == 2048 and s.sources["max_total_tokens"] == "MAX_TOTAL_TOKENS"
    s = Settings.from_env({"SM_VLLM_MAX_LORAS": "4", "OPTION_MAX_LORAS": "4"})
    assert dict(s.vllm_flags) == {"OPTION_MAX_LORAS": "4", "SM_VLLM_MAX_LORAS": "4"}


def test_other_flags_pass_through_to_vllm_and_show_at_start_up():
    env = {"SM_VLLM_ENFORCE_EAGER": "", "OPTION_MAX_LORAS": '"4"', "OPTION_EMPTY": "", "SM_VLLM_": "x",
           "SM_NUM_GPUS": "1", "HOSTNAME": "x"}
    s = Settings.from_env(env)
    assert dict(s.vllm_flags) == {"SM_VLLM_ENFORCE_EAGER": "", "OPTION_MAX_LORAS": "4"}
    lines = s.describe()
    assert "vllm flag --enforce-eager='' (from SM_VLLM_ENFORCE_EAGER)" in lines
    assert "vllm flag --max-loras='4' (from OPTION_MAX_LORAS)" in lines


def test_unhonoured_settings_get_one_warning_each():
    s = Settings.from_env({"CPU_KERNELS": "false", "SM_VLLM_MAX_LORAS": "4", "OPTION_ROLLING_BATCH": "vllm",
                           "SM_VLLM_MAX_MODEL_LEN": "2048", "BATCH_INVARIANT": "true", "MAX_LORA_RANK": "8"})
    vllm = s.unhonoured("vllm")
    assert vllm == ["CPU_KERNELS is not honoured by ENGINE=vllm (it selects sagellm's own CPU kernels)",
                    "BATCH_INVARIANT is not honoured by ENGINE=vllm (vLLM's batches are not made invariant; "
                    "greedy output may change with the batch)"]
    ours = s.unhonoured("sagellm")
    assert ours == ["OPTION_ROLLING_BATCH is a vLLM argument; ENGINE=sagellm does not honour it",
                    "SM_VLLM_MAX_LORAS is a vLLM argument; ENGINE=sagellm does not honour it"]
    assert Settings.from_env({}).unhonoured("vllm") == [] and Settings.from_env({}).unhonoured("sagellm") == []


def test_engine_setting():
    assert Settings.from_env({}).engine == "auto"
    assert Settings.from_env({"ENGINE": "vLLM"}).engine == "vllm"
    with pytest.raises(SettingsError, match=r"^ENGINE='tgi' is not one of auto, sagellm, vllm"):
        Settings.from_env({"ENGINE": "tgi"})


@pytest.mark.parametrize("cuda,installed,expected", [
    (True, True, ("vllm", "ENGINE=auto: a CUDA device is visible and vLLM is installed")),
    (True, False, ("sagellm", "ENGINE=auto: a CUDA device is visible but vLLM is not installed")),
    (False, True, ("sagellm", "ENGINE=auto and no CUDA device is visible")),
])
def test_auto_picks_vllm_only_on_a_gpu_with_vllm(monkeypatch, cuda, installed, expected):
    monkeypatch.setattr(choice, "cuda_visible", lambda: cuda)
    monkeypatch.setattr(choice, "vllm_installed", lambda: installed)
    assert choice.choose_engine("auto") == expected
    assert choice.choose_engine("sagellm") == ("sagellm", "ENGINE=sagellm")


def test_engine_vllm_without_vllm_stops_start_up(monkeypatch):
    monkeypatch.setattr(choice, "vllm_installed", lambda: False)
    with pytest.raises(ModelLoadError, match="ENGINE=vllm but vLLM is not installed"):
        choice.choose_engine("vllm")
