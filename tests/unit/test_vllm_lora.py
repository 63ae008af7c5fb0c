"""ENGINE=vllm's LoRA arguments: MAX_LORAS plus the slot kept empty for base-model rows,
MAX_LORA_RANK rounded up to a rank vLLM takes (and said), and vLLM's own max_loras flag shrinking
the registry so that slot stays empty."""

from __future__ import annotations

import pytest

from sagellm.engine.adapters import AdapterRegistry
from sagellm.engine.vllm.lora import engine_kwargs, fit_slots
from sagellm.errors import ModelLoadError
from sagellm.settings import Settings


def test_max_loras_gets_one_empty_slot_and_the_rank_is_rounded_up_and_said():
    kwargs, lines = engine_kwargs(Settings.from_env({"MAX_LORAS": "3", "MAX_LORA_RANK": "20"}))
    assert kwargs == {"enable_lora": True, "max_loras": 4, "max_cpu_loras": 4, "max_lora_rank": 32}
    assert any("MAX_LORA_RANK=20 is rounded up to 32" in line for line in lines), lines


def test_defaults_and_an_exact_rank_say_nothing_of_rounding():
    kwargs, lines = engine_kwargs(Settings.from_env({"LORA_ADAPTERS": "a=/x"}))
    assert (kwargs["max_loras"], kwargs["max_lora_rank"]) == (9, 64)
    assert not any("rounded" in line for line in lines)


def test_a_rank_above_vllms_largest_stops_start_up():
    with pytest.raises(ModelLoadError, match="MAX_LORA_RANK=600 is above vLLM's largest LoRA rank 512"):
        engine_kwargs(Settings.from_env({"MAX_LORAS": "2", "MAX_LORA_RANK": "600"}))


def test_vllm_flag_for_max_loras_shrinks_the_registry_by_the_empty_slot():
    reg = AdapterRegistry(lambda name, folder: None, max_loras=8)
    fit_slots(reg, 9)
    assert reg.max_loras == 8
    fit_slots(reg, 3)  # SM_VLLM_MAX_LORAS=3
    assert reg.max_loras == 2
    with pytest.raises(ModelLoadError, match="max_loras=1 leaves no adapter slot"):
        fit_slots(reg, 1)


def test_registry_checks_each_adapter_against_the_base_models_shapes(tmp_path):
    from lora_adapters import make_adapter
    from transformers import AutoConfig

    from sagellm.engine.vllm.lora import registry
    from sagellm.model import bundled

    base = str(bundled.bundled_model_dir(None))
    alpha = make_adapter(base, "alpha", tmp_path, 0)
    config = AutoConfig.from_pretrained(base)
    reg = registry(Settings.from_env({"MAX_LORAS": "2"}), config, base, "served", [("alpha", alpha.path)])
    (weights,) = reg.resident_weights()
    assert (reg.names(), weights.rank, weights.targets) == (("alpha",), 4, ["self_attn.q_proj", "self_attn.v_proj"])
    with pytest.raises(ModelLoadError, match="`alpha`: rank 4 is above MAX_LORA_RANK=2"):
        registry(Settings.from_env({"MAX_LORA_RANK": "2"}), config, base, "served", [("alpha", alpha.path)])
    config.num_hidden_layers = 4
    with pytest.raises(ModelLoadError, match="`alpha`: target module layers.4.self_attn.q_proj is absent"):
        registry(Settings.from_env({"MAX_LORAS": "2"}), config, base, "served", [("alpha", alpha.path)])
