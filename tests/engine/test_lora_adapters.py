"""Reading peft adapters: a bad one is refused with one line naming it and what is wrong
(missing file, rank above MAX_LORA_RANK, a target module the base lacks, another base model's
shapes, a peft feature the engine does not apply). tests/clients/test_lora.py checks that `serve`
stops at start-up on one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_adapters import make_adapter
from sagellm.model import bundled
from sagellm.model.lora import AdapterError, read_adapter


@pytest.fixture(scope="module")
def alpha(tmp_path_factory):
    return make_adapter(str(bundled.bundled_model_dir(None)), "alpha", tmp_path_factory.mktemp("a"), 0)


def copy(alpha, tmp_path, name="bad"):
    path = tmp_path / name
    shutil.copytree(alpha.path, path)
    return path


def edit_weights(path, change):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file(change(tensors), str(path / "adapter_model.safetensors"))


def refused(path, model, max_rank=64) -> str:
    with pytest.raises(AdapterError) as info:
        read_adapter("bad", str(path), model, max_rank)
    msg = info.value.message
    assert "`bad`" in msg and "\n" not in msg, msg
    return msg


def test_a_good_adapter_reads_with_its_scaling(alpha, loaded_model):
    w = read_adapter("alpha", alpha.path, loaded_model.model.module, 64)
    assert w.rank == 4 and w.targets == ["self_attn.q_proj", "self_attn.v_proj"]
    a, b = w.modules[(0, "self_attn.q_proj")]
    raw = load_file(alpha.path + "/adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    assert torch.equal(a, raw[key + "A.weight"].t())
    assert torch.allclose(b, raw[key + "B.weight"].t() * 2.0)  # lora_alpha 8 / r 4


def test_missing_files(alpha, loaded_model, tmp_path):
    path = copy(alpha, tmp_path)
    (path / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in refused(path, loaded_model.model.module)
    assert "not a folder" in refused(tmp_path / "nowhere", loaded_model.model.module)


def test_rank_above_max_lora_rank(alpha, loaded_model):
    assert "rank 4 is above MAX_LORA_RANK=2" in refused(alpha.path, loaded_model.model.module, max_rank=2)


def test_target_module_absent(alpha, loaded_model, tmp_path):
    path = copy(alpha, tmp_path)
    edit_weights(path, lambda t: {k.replace("q_proj", "qkv_proj"): v for k, v in t.items()})
    assert "qkv_proj is absent" in refused(path, loaded_model.model.module)
    path = copy(alpha, tmp_path, "bad2")
    edit_weights(path, lambda t: {k.replace("layers.0.", "layers.99."): v for k, v in t.items()})
    assert "layers.99" in refused(path, loaded_model.model.module)


def test_different_base_model(alpha, loaded_model, tmp_path):
    path = copy(alpha, tmp_path)
    edit_weights(path, lambda t: {k: (v[:, :500].contiguous() if "lora_A" in k else v) for k, v in t.items()})
    assert "different base model" in refused(path, loaded_model.model.module)


@pytest.mark.parametrize("key,value", [("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"),
                                       ("rank_pattern", {"q_proj": 8})])
def test_unapplied_peft_features_are_refused(alpha, loaded_model, tmp_path, key, value):
    path = copy(alpha, tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config[key] = value
    (path / "adapter_config.json").write_text(json.dumps(config))
    refused(path, loaded_model.model.module)

