"""Quantized weights on sagellm's own engine: which checkpoints transformers can run for it, and
how they load. Our kernels and lean decoder read dense weights, so a checkpoint loads only where
transformers can dequantize it at load: compressed-tensors with weight-only schemes (int or float,
any bit width; the package is installed). Everything else (bitsandbytes, fp8, awq, gptq, torchao,
quantizing at load, activation quantization) is refused with one line naming it and suggesting
ENGINE=vllm, whose kernels run those weights as they are."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from sagellm.errors import ModelLoadError
from sagellm.settings import Settings

log = logging.getLogger(__name__)

DEQUANTIZED = ("compressed-tensors",)  # methods we load, dequantized to the serving dtype


def checkpoint_quantization(config) -> dict | None:
    """The quantization_config a checkpoint's config carries (a transformers config, or the
    folder holding config.json), as a dict; None when its weights are not quantized."""
    if isinstance(config, (str, Path)):
        try:
            q = json.loads((Path(config) / "config.json").read_text()).get("quantization_config")
        except (OSError, ValueError):
            return None
    else:
        q = getattr(config, "quantization_config", None)
    if q is None or isinstance(q, dict):
        return q or None
    return q.to_dict()


def _refuse(what: str) -> ModelLoadError:
    return ModelLoadError(f"{what}: sagellm's engine runs dense weights and compressed-tensors weight-only "
                          "checkpoints (dequantized at load); serve it with ENGINE=vllm, or unquantized weights")


def load_kwargs(settings: Settings, config) -> dict:
    """from_pretrained's extra arguments for the checkpoint's quantization ({} when dense), or a
    ModelLoadError saying why our engine cannot run it. config: as for checkpoint_quantization."""
    q = checkpoint_quantization(config)
    method = q.get("quant_method") if q else None
    asked = settings.quantize
    if asked and method is None:
        raise _refuse(f"HF_MODEL_QUANTIZE={asked} asks to quantize unquantized weights at load")
    if asked and asked.replace("_", "-") != str(method).replace("_", "-"):
        raise _refuse(f"HF_MODEL_QUANTIZE={asked} but the checkpoint is quantized with {method}")
    if method is None:
        return {}
    if method not in DEQUANTIZED:
        raise _refuse(f"the checkpoint is quantized with {method}")
    if importlib.util.find_spec("compressed_tensors") is None:
        raise _refuse(f"the checkpoint is quantized with {method} and the compressed-tensors package is missing")
    activations = [name for name, group in (q.get("config_groups") or {}).items()
                   if group.get("input_activations") or group.get("output_activations")]
    if activations:  # dequantized weights alone would compute something else than the checkpoint means
        raise _refuse(f"the {method} checkpoint quantizes activations too (config group {activations[0]})")
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def describe(config, dtype: str) -> list[str]:
    """The start-up line for a quantized checkpoint (none for a dense one). dtype: the serving one."""
    q = checkpoint_quantization(config)
    if not q:
        return []
    return [f"quantization={q.get('quant_method')} (format {q.get('format')}): weights dequantized to "
            f"{dtype} at load, so they take the memory of unquantized ones"]
