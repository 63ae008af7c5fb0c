"""HF_MODEL_QUANTIZE and pre-quantized checkpoints on our own engine: a compressed-tensors
weight-only checkpoint (int8 per channel, built and compressed here from a tiny random model)
loads, dequantized, and its greedy tokens and logprobs equal transformers' own forward on the same
checkpoint; what transformers cannot run for us here is refused with one line naming the method
and suggesting ENGINE=vllm."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from families import Reference, build
from sagellm.errors import ModelLoadError

PROMPT = [1, 504, 3458, 282, 4649, 314, 216, 28, 33, 1152]  # any ids of the bundled tokenizer


def compress_int8(dense, folder, activations: bool = False):
    """`dense`'s Linear layers (not lm_head) as int8 per output channel, symmetric, in
    compressed-tensors' int-quantized format, saved to `folder` with the tokenizer."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs if activations else None)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                                        quantization_status=QuantizationStatus.INITIALIZED))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight_scale"):  # absmax per output row / 127; weight [out, in], scale [out, 1]
                m.weight_scale.copy_(m.weight.abs().amax(dim=1, keepdim=True) / 127)
                m.weight_zero_point.zero_()
                m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (dense / name).exists():
            shutil.copy(dense / name, folder)
    return folder


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from sagellm.model.bundled import bundled_model_dir

    return build("llama", tmp_path_factory.mktemp("dense"), bundled_model_dir())


@pytest.fixture(scope="module")
def int8(dense, tmp_path_factory):
    return compress_int8(dense, tmp_path_factory.mktemp("w8a16"))


def settings_for(folder, **env):
    from sagellm.settings import Settings

    return Settings.from_env({"HF_MODEL_ID": str(folder), "DTYPE": "float32", "ENGINE": "sagellm",
                              "MAX_TOTAL_TOKENS": "256", **env})


def test_a_compressed_tensors_checkpoint_serves_as_transformers_runs_it(int8, dense):
    from sagellm.engine.builder import build_engine
    from sagellm.engine.sampling_params import SamplingParams

    assert json.loads((int8 / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    ref = Reference(int8)  # transformers' own compressed-tensors route, decompressing on first forward
    want, want_logprobs = ref.greedy(PROMPT, 12), ref.logprobs(PROMPT)
    # The int8 rounding moves the logprobs far more than the tolerance: dense weights would fail.
    assert max(abs(a - b) for a, b in zip(want_logprobs, Reference(dense).logprobs(PROMPT))) > 1e-2
    for quantize in ({}, {"HF_MODEL_QUANTIZE": "compressed-tensors"}):
        client = build_engine(settings_for(int8, **quantize), "cpu")
        try:
            events = list(client.submit(PROMPT, SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                               logprobs=True, prompt_logprobs=True)))
        finally:
            client.shutdown()
        assert [e.token_id for e in events] == want
        got = [p.logprob for p in events[0].prompt_logprobs[1:]]
        assert max(abs(a - b) for a, b in zip(got, want_logprobs)) < 1e-4


def with_quantization_config(dense, folder, quantization_config: dict):
    shutil.copytree(dense, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return folder


@pytest.mark.parametrize("case,env,words", [
    ("dense", {"HF_MODEL_QUANTIZE": "bitsandbytes"}, ["HF_MODEL_QUANTIZE=bitsandbytes", "unquantized weights at load"]),
    ("dense", {"HF_MODEL_QUANTIZE": "fp8"}, ["HF_MODEL_QUANTIZE=fp8"]),
    ("gptq", {}, ["quantized with gptq"]),
    ("awq", {"HF_MODEL_QUANTIZE": "awq"}, ["quantized with awq"]),
    ("int8", {"HF_MODEL_QUANTIZE": "awq"}, ["HF_MODEL_QUANTIZE=awq", "quantized with compressed-tensors"]),
    ("w8a8", {}, ["quantizes activations"]),
])
def test_what_our_engine_cannot_run_is_refused_with_one_line(case, env, words, dense, int8, tmp_path):
    from sagellm.engine.builder import build_engine

    folder = {"dense": dense, "int8": int8,
              "gptq": lambda: with_quantization_config(dense, tmp_path / "gptq", {"quant_method": "gptq", "bits": 4}),
              "awq": lambda: with_quantization_config(dense, tmp_path / "awq", {"quant_method": "awq", "bits": 4}),
              "w8a8": lambda: compress_int8(dense, tmp_path / "w8a8", activations=True)}[case]
    folder = folder() if callable(folder) else folder
    with pytest.raises(ModelLoadError) as info:
        build_engine(settings_for(folder, **env), "cpu")
    message = info.value.message
    assert "\n" not in message and "ENGINE=vllm" in message
    for w in words:
        assert w in message, message
