"""Where the weights come from: HF_MODEL_ID (local path or hub id), /opt/ml/model, or bundled."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sagellm.errors import ModelLoadError
from sagellm.model import bundled
from sagellm.settings import Settings

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass(frozen=True)
class ModelSource:
    path: str  # a local folder to load from
    kind: str  # "local", "hub", "sagemaker" or "bundled"
    model_id: str  # as the user named it (shown in /info)


def holds_weights(folder: str | Path) -> bool:
    p = Path(folder)
    return p.is_dir() and (p / "config.json").is_file() and any(
        f.name.endswith(_WEIGHT_SUFFIXES) for f in p.iterdir())


def resolve_model(settings: Settings) -> ModelSource:
    if settings.model_id:
        mid = settings.model_id
        if os.path.isdir(mid):
            if not holds_weights(mid):
                raise ModelLoadError(f"HF_MODEL_ID={mid} is a folder without config.json and weights")
            kind = "sagemaker" if os.path.abspath(mid) == os.path.abspath(settings.model_dir) else "local"
            return ModelSource(mid, kind, mid)
        if mid.startswith(("/", "./", "s3://")):
            raise ModelLoadError(f"HF_MODEL_ID={mid} is neither an existing folder nor a hub id"
                                 + (" (s3:// is not supported: pass it as model_data)" if mid.startswith("s3://") else ""))
        return ModelSource(_download(mid, settings), "hub", mid)
    if holds_weights(settings.model_dir):
        log.info("using the model artifacts in %s", settings.model_dir)
        return ModelSource(settings.model_dir, "sagemaker", settings.model_dir)
    return ModelSource(str(bundled.bundled_model_dir(settings.cache_dir)), "bundled", bundled.NAME)


def _download(model_id: str, settings: Settings) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model_id, revision=settings.revision, token=settings.hf_token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"],
        )
    except Exception as exc:  # network, auth, unknown repo: one clear line
        hint = "" if settings.hf_token else " (gated models need HF_TOKEN)"
        raise ModelLoadError(f"could not fetch HF_MODEL_ID={model_id}"
                             f"{'@' + settings.revision if settings.revision else ''}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{hint}") from exc
