"""The settings that choose and configure the engine beyond our own names: the migration names of
AWS's vLLM container (SM_VLLM_<FLAG>, any `vllm serve` flag) and of LMI (OPTION_<ARG>, LMI's
options and any vLLM engine argument), and which settings each engine does not honour.

Pure: no environment reads (sagellm.settings passes the mapping in) and no vLLM import.
"""

from __future__ import annotations

from typing import Mapping

from sagellm import env_values as ev
from sagellm.errors import SettingsError

# AWS's vLLM container (deep-learning-containers vllm/build_artifacts/sagemaker_entrypoint.sh):
# SM_VLLM_MAX_MODEL_LEN=2048 -> `--max-model-len 2048`; an empty value gives the bare flag.
SM_VLLM = "SM_VLLM_"
# LMI (djl-serving docs): option.<arg> in serving.properties is OPTION_<ARG> in the environment;
# any vLLM EngineArgs field passes through, booleans as "true"/"false".
LMI = "OPTION_"
# LMI names that rename a vLLM engine argument (LMI's vLLM user guide).
_LMI_RENAMES = {"cpu_offload_gb_per_gpu": "cpu_offload_gb"}

# vLLM 0.32's quantization methods (vllm.model_executor.layers.quantization.QUANTIZATION_METHODS)
# beyond TGI's names, less the deprecated ones; a unit test keeps this list in step with vLLM.
QUANTIZATIONS = ("auto_awq", "modelopt", "modelopt_fp4", "modelopt_mxfp8", "modelopt_mixed",
                 "auto_gptq", "gptq_marlin", "awq_marlin", "humming", "experts_int8", "quark",
                 "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8", "online",
                 "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only",
                 "nvfp4_per_token", "mxfp8")

# Settings that only sagellm's own engine reads: with ENGINE=vllm, setting them earns a warning.
_ONLY_SAGELLM = {"cpu_kernels": "it selects sagellm's own CPU kernels",
                 "batch_invariant": "vLLM's batches are not made invariant; greedy output may change with the batch"}


def is_bare_flag(name: str, raw: str) -> bool:
    """SM_VLLM_X set to nothing: AWS's container passes `--x` alone (a boolean flag, on)."""
    return name.startswith(SM_VLLM) and raw.strip() == ""


def flag_of(name: str) -> str:
    """The vLLM argument a migration variable names: SM_VLLM_MAX_LORAS -> max_loras."""
    prefix = SM_VLLM if name.startswith(SM_VLLM) else LMI
    flag = name[len(prefix):].lower()
    return _LMI_RENAMES.get(flag, flag) if prefix == LMI else flag


def pass_through(environ: Mapping[str, str], claimed: frozenset[str]) -> dict[str, str]:
    """SM_VLLM_* and OPTION_* variables that are not one of our settings' names: {name: text}.
    Two names for the same vLLM argument must agree."""
    found: dict[str, str] = {}
    by_flag: dict[str, tuple[str, str]] = {}
    for name in sorted(environ):
        if name in claimed or not name.startswith((SM_VLLM, LMI)) or name in (SM_VLLM, LMI):
            continue
        raw = environ[name]
        text = "" if is_bare_flag(name, raw) else ev.unquote(raw)
        if not text and not name.startswith(SM_VLLM):
            continue  # an empty OPTION_ counts as unset, as everywhere else
        flag = flag_of(name)
        if flag in by_flag and by_flag[flag][1].lower() != text.lower():
            other, other_text = by_flag[flag]
            raise SettingsError(f"{other}={other_text!r} and {name}={text!r} disagree; set only one")
        by_flag[flag] = (name, text)
        found[name] = text
    return found


def unhonoured(settings, engine: str) -> list[str]:
    """One line per variable the user set that `engine` ("sagellm" or "vllm") does not read."""
    lines = []
    if engine == "vllm":
        for field, why in _ONLY_SAGELLM.items():
            source = settings.sources.get(field)
            if source:
                lines.append(f"{source} is not honoured by ENGINE=vllm ({why})")
    else:
        lines.extend(f"{name} is a vLLM argument; ENGINE={engine} does not honour it"
                     for name in settings.vllm_flags)
    return lines
