"""LoRA adapters as peft saves them (adapter_config.json + adapter_model.safetensors), read and
checked against the loaded base model: LoraWeights holds, per (decoder layer, projection), the
low-rank pair the engine adds to that projection's output (sagellm.model.lora_step applies it).

Read with safetensors directly, so peft is not a runtime dependency. Anything in the config the
engine does not apply (DoRA, trained biases, modules_to_save, per-module ranks...) is refused with
one line naming the adapter, never ignored.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sagellm.errors import ModelLoadError

log = logging.getLogger(__name__)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# peft's key: base_model.model.<path to the layer list>.<layer>.<projection>.lora_{A,B}.weight
_KEY = re.compile(r"^base_model\.model\.(?:.+\.)?layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
# Config entries that change what the adapter computes; each must be at its no-op value.
_REFUSED = {"use_dora": "DoRA (use_dora)", "lora_bias": "trained LoRA biases (lora_bias)",
            "fan_in_fan_out": "fan_in_fan_out weights", "modules_to_save": "modules_to_save",
            "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
            "layer_replication": "layer_replication", "trainable_token_indices": "trainable_token_indices",
            "target_parameters": "target_parameters", "alora_invocation_tokens": "activated LoRA (aLoRA)"}
_uids = itertools.count(1)


class AdapterError(ModelLoadError):
    """An adapter that cannot be served; the message names it and what is wrong, on one line."""


@dataclass
class LoraWeights:
    """One adapter, ready to apply. modules[(layer, projection)] = (A [in, r], B [r, out] * scaling),
    so a projection's output gains x @ A @ B; projection is its path in the layer
    ("self_attn.q_proj"). uid is unique per load: prefix-cache keys start from it."""

    name: str
    path: str
    rank: int
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def targets(self) -> list[str]:
        return sorted({name for _, name in self.modules})


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The causal LM's decoder layers (model.model.layers in transformers' families), or None."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _fail(name: str, why: str) -> AdapterError:
    return AdapterError(f"LoRA adapter `{name}`: {why}")


def read_config(name: str, folder: str) -> dict:
    path = Path(folder)
    if not path.is_dir():
        raise _fail(name, f"{folder} is not a folder")
    if not (path / CONFIG).is_file():
        raise _fail(name, f"{CONFIG} is missing in {folder}")
    if not (path / WEIGHTS).is_file():
        bin_file = " (adapter_model.bin is not read: save it with safe_serialization)" if (
            path / "adapter_model.bin").is_file() else ""
        raise _fail(name, f"{WEIGHTS} is missing in {folder}{bin_file}")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise _fail(name, f"{CONFIG} is not valid JSON: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise _fail(name, f"peft_type {config.get('peft_type')} is not LoRA")
    for key, what in _REFUSED.items():
        if config.get(key):
            raise _fail(name, f"{what} is not supported")
    if config.get("bias", "none") != "none":
        raise _fail(name, f"trained biases (bias={config['bias']}) are not supported")
    return config


def _check_base(name: str, config: dict, base_id: str | None) -> None:
    """Same shapes can still be another fine-tune's base: say so in one line, as names may differ
    only by where the base was stored (a hub id here, a local copy there)."""
    trained_on = config.get("base_model_name_or_path")
    if trained_on and base_id and Path(trained_on).name.lower() != Path(base_id).name.lower():
        log.warning("LoRA adapter `%s` names %s as its base model; serving it on %s", name, trained_on, base_id)


def read_adapter(name: str, folder: str, model: nn.Module, max_rank: int, base_id: str | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoraWeights:
    """The adapter in `folder`, checked against `model` (transformers' causal LM): every tensor must
    target a linear projection the base has, with its shapes, and the rank be at most max_rank."""
    from safetensors import safe_open

    config = read_config(name, folder)
    _check_base(name, config, base_id)
    layers = decoder_layers(model)
    if layers is None:
        raise _fail(name, f"{type(model).__name__} has no decoder layer list to apply adapters to")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(Path(folder) / WEIGHTS), "pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    target = key.removeprefix("base_model.model.").split(".lora_")[0]
                    raise _fail(name, f"target module {target} is not supported (only the decoder layers' "
                                      "linear projections)")
                pairs.setdefault((int(m[1]), m[2]), {})[m[3]] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise _fail(name, f"cannot read {WEIGHTS}: {type(exc).__name__}: {exc}") from None
    if not pairs:
        raise _fail(name, f"{WEIGHTS} holds no LoRA weights")
    alpha = config.get("lora_alpha", config.get("r", 8))
    modules = {}
    rank = 0
    for (layer, proj), ab in sorted(pairs.items()):
        where = f"layers.{layer}.{proj}"
        if set(ab) != {"A", "B"}:
            raise _fail(name, f"{where} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]  # [r, in], [out, r]
        r = a.shape[0]
        if r > max_rank:
            raise _fail(name, f"rank {r} is above MAX_LORA_RANK={max_rank}")
        if layer >= len(layers):
            raise _fail(name, f"target module {where} is absent: the base model has {len(layers)} layers "
                              "(an adapter of a different base model?)")
        try:
            module = layers[layer].get_submodule(proj)
        except AttributeError:
            raise _fail(name, f"target module {where} is absent from the base model") from None
        if not hasattr(module, "in_features"):
            raise _fail(name, f"target module {where} is a {type(module).__name__}, not a linear projection")
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or (a.shape[1], b.shape[0]) != (
                module.in_features, module.out_features):
            raise _fail(name, f"{where} is {tuple(a.shape[1:])}->{tuple(b.shape[:1])} in the adapter, "
                              f"{module.in_features}->{module.out_features} in the base model "
                              "(an adapter of a different base model)")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        dt = dtype or a.dtype
        modules[(layer, proj)] = (a.t().to(device=device, dtype=dt).contiguous(),
                                  (b.float() * scaling).t().to(device=device, dtype=dt).contiguous())
        rank = max(rank, r)
    return LoraWeights(name, os.path.abspath(folder), rank, modules)


def folder_adapters(model_dir: str) -> list[tuple[str, str]]:
    """SageMaker's layout: each folder under <model_dir>/adapters/ holding an adapter_config.json."""
    root = Path(model_dir) / "adapters"
    if not root.is_dir():
        return []
    return [(p.name, str(p)) for p in sorted(root.iterdir()) if p.is_dir() and (p / CONFIG).is_file()]


def locate(name: str, src: str, token: str | None = None) -> str:
    """A local folder for `src`: the folder itself, or a hub id's files fetched with
    huggingface_hub (from its cache when HF_HUB_OFFLINE is set)."""
    if os.path.isdir(src):
        return src
    if src.startswith(("/", "./", "../", "~", "s3://")) or src.count("/") > 1:
        raise _fail(name, f"{src} is not a folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(src, token=token, allow_patterns=[CONFIG, WEIGHTS])
    except Exception as exc:
        raise _fail(name, f"{src} is neither a folder nor a hub id that could be fetched: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
