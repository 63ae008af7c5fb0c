"""Settings -> vLLM's engine arguments (sagellm/engine/vllm/args.py), with vLLM's own parser for
the SM_VLLM_/OPTION_ pass-through, and our SamplingParams -> vLLM's (params.py). No engine runs."""

from __future__ import annotations

import pytest

from sagellm.engine.sampling_params import SamplingParams
from sagellm.engine.vllm.args import engine_args, kv_bytes_per_token
from sagellm.engine.vllm.params import check_supported, to_vllm
from sagellm.errors import SettingsError, ValidationError
from sagellm.settings import Settings
from sagellm.settings_vllm import QUANTIZATIONS


@pytest.fixture(scope="module")
def config():
    from transformers import AutoConfig

    from sagellm.model.bundled import bundled_model_dir

    return AutoConfig.from_pretrained(bundled_model_dir())


def args_for(env: dict, config, device: str = "cpu"):
    from sagellm.model.bundled import bundled_model_dir

    return engine_args(Settings.from_env(env), str(bundled_model_dir()), config, device, 1)


def test_our_settings_map_onto_vllms(config):
    env = {"MAX_TOTAL_TOKENS": "1024", "MAX_BATCH_PREFILL_TOKENS": "512", "MAX_BATCH_SIZE": "8", "DTYPE": "bf16",
           "PREFIX_CACHING": "false", "HF_MODEL_TRUST_REMOTE_CODE": "true", "KV_CACHE_MEMORY_MB": "256",
           "MAX_TOP_N_TOKENS": "5", "CUDA_MEMORY_FRACTION": "0.7", "HF_MODEL_QUANTIZE": "awq"}
    args, warnings = args_for(env, config, "cuda")
    assert warnings == []
    assert args.model == args.tokenizer and args.model.endswith("smollm2-135m-instruct")
    assert (args.max_model_len, args.max_num_batched_tokens, args.max_num_seqs) == (1024, 512, 8)
    assert (args.dtype, args.enable_prefix_caching, args.trust_remote_code, args.quantization) == \
        ("bfloat16", False, True, "awq")
    assert (args.kv_cache_memory_bytes, args.max_logprobs, args.gpu_memory_utilization) == (256 << 20, 5, 0.7)
    assert args.structured_outputs_config["backend"] == "guidance"


def test_kv_cache_size(config):
    per_token = kv_bytes_per_token(config, 4, 1)
    assert per_token == 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads of 64, fp32
    args, _ = args_for({"MAX_BATCH_TOTAL_TOKENS": "4096", "DTYPE": "float32"}, config)
    assert args.kv_cache_memory_bytes == 4096 * per_token
    args, _ = args_for({}, config, "cuda")  # on a GPU vLLM sizes it from gpu_memory_utilization
    assert args.kv_cache_memory_bytes is None and args.gpu_memory_utilization == 0.9
    args, _ = args_for({}, config, "cpu")  # on CPU never more than the 4 GiB default
    assert 0 < args.kv_cache_memory_bytes <= 4 << 30


def test_pass_through_flags_are_parsed_by_vllm(config):
    env = {"SM_VLLM_ENFORCE_EAGER": "", "OPTION_MAX_LORAS": "4", "OPTION_ENABLE_CHUNKED_PREFILL": "false",
           "SM_VLLM_BLOCK_SIZE": "32", "OPTION_CPU_OFFLOAD_GB_PER_GPU": "3"}
    args, warnings = args_for(env, config)
    assert warnings == []
    assert (args.enforce_eager, args.max_loras, args.enable_chunked_prefill, args.cpu_offload_gb, args.block_size) == \
        (True, 4, False, 3, 32)


def test_flags_that_are_not_engine_arguments_are_warned_about(config):
    env = {"SM_VLLM_PORT": "9000", "SM_VLLM_TOOL_CALL_PARSER": "hermes", "OPTION_ROLLING_BATCH": "vllm",
           "OPTION_ENTRYPOINT": "djl_python.huggingface"}
    _, warnings = args_for(env, config)
    assert len(warnings) == 4
    assert any(w.startswith("SM_VLLM_PORT: `vllm serve --port` configures vLLM's own HTTP server") for w in warnings)
    assert "OPTION_ROLLING_BATCH is not a vLLM engine argument; not honoured" in warnings


@pytest.mark.parametrize("env,message", [
    ({"SM_VLLM_NO_SUCH_FLAG": "1"}, "SM_VLLM_NO_SUCH_FLAG: `vllm serve` has no --no-such-flag flag"),
    ({"SM_VLLM_MAX_LORAS": "many"}, "SM_VLLM_MAX_LORAS='many' is not accepted by vLLM"),
    ({"OPTION_ENFORCE_EAGER": "sometimes"}, "OPTION_ENFORCE_EAGER='sometimes' is not a boolean"),
    ({"SM_VLLM_MAX_LORAS": ""}, "SM_VLLM_MAX_LORAS needs a value"),
    ({"HF_MODEL_QUANTIZE": "bitsandbytes-nf4"}, "HF_MODEL_QUANTIZE=bitsandbytes-nf4 is not available with ENGINE=vllm"),
])
def test_bad_flags_stop_start_up_naming_the_variable(config, env, message):
    with pytest.raises(SettingsError) as info:
        args_for(env, config)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_our_quantization_names_include_vllms():
    from vllm.model_executor.layers.quantization import DEPRECATED_QUANTIZATION_METHODS, QUANTIZATION_METHODS

    from sagellm.settings import QUANTIZE_METHODS

    assert set(QUANTIZATION_METHODS) - set(DEPRECATED_QUANTIZATION_METHODS) <= set(QUANTIZE_METHODS)
    assert set(QUANTIZATIONS) <= set(QUANTIZATION_METHODS)


def test_sampling_params_map_onto_vllms():
    p = SamplingParams(max_new_tokens=20, do_sample=True, temperature=0.7, top_k=40, top_p=0.9, seed=5,
                       repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.25,
                       logit_bias=((7, 2.0),), min_new_tokens=3, top_n_tokens=4, prompt_logprobs=True,
                       stop=("x",), stop_token_ids=(9,))
    v = to_vllm(p, 49152)
    assert (v.max_tokens, v.min_tokens, v.temperature, v.top_k, v.top_p, v.seed) == (20, 3, 0.7, 40, 0.9, 5)
    assert (v.repetition_penalty, v.frequency_penalty, v.presence_penalty, v.logit_bias) == (1.1, 0.5, 0.25, {7: 2.0})
    assert (v.logprobs, v.prompt_logprobs, v.detokenize) == (4, 0, False)
    assert v.stop == [] and v.stop_token_ids == []  # ours to find, not vLLM's
    greedy = to_vllm(SamplingParams(max_new_tokens=5, temperature=0.7, top_k=40, seed=3, logprobs=False), 49152)
    assert (greedy.temperature, greedy.top_k, greedy.seed, greedy.logprobs, greedy.prompt_logprobs) == \
        (0.0, 0, None, None, None)
    # ignore_eos: vLLM's would only keep going past an EOS; ours never picks one.
    eos = to_vllm(SamplingParams(max_new_tokens=9, ignore_eos=True), 49152)
    assert (eos.ignore_eos, eos.min_tokens) == (True, 9)
    assert to_vllm(SamplingParams(max_new_tokens=5, do_sample=True, top_k=10**6), 49152).top_k == 0


@pytest.mark.parametrize("params,field", [
    (SamplingParams(max_new_tokens=4, typical_p=0.9), "typical_p"),
    (SamplingParams(max_new_tokens=4, do_sample=True, temperature=2.5), "temperature"),
    (SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.005), "temperature"),
])
def test_refusals_name_the_field_and_the_engine(params, field):
    with pytest.raises(ValidationError) as info:
        check_supported(params)
    assert info.value.param == field and "ENGINE=vllm" in info.value.message and info.value.status == 422


def test_greedy_ignores_sampling_only_fields():
    check_supported(SamplingParams(max_new_tokens=4, temperature=5.0))  # greedy: temperature unused
