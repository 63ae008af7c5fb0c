"""Settings -> vLLM's AsyncEngineArgs: our names mapped onto vLLM's, then the SM_VLLM_<FLAG> and
OPTION_<ARG> pass-through flags parsed by vLLM's own command-line parser (as AWS's container and
LMI hand them over), so any `vllm serve` engine flag works and a bad one fails naming its variable."""

from __future__ import annotations

import argparse
import contextlib
import io

import psutil

from sagellm import env_values as ev
from sagellm.errors import SettingsError
from sagellm.settings import Settings
from sagellm.settings_vllm import SM_VLLM, flag_of

# TGI's names that vLLM spells differently; TGI's methods vLLM 0.32 does not have.
_VLLM_QUANTIZATION = {"marlin": "gptq_marlin"}
_NOT_IN_VLLM = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "eetq", "exl2")
# On CPU vLLM allocates its KV cache whole at start-up (ours grows into it); the default is half
# the available memory times CUDA_MEMORY_FRACTION, as ours, but at most 4 GiB.
_CPU_DEFAULT_KV_BYTES = 4 << 30


def kv_bytes_per_token(config, dtype_bytes: int, world: int) -> int:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * max(kv_heads // world, 1) * head_dim * dtype_bytes


def _dtype_bytes(settings: Settings, config) -> int:
    name = settings.dtype or str(getattr(config, "dtype", None) or "bfloat16").replace("torch.", "")
    return 4 if name == "float32" else 2


def kv_cache_bytes(settings: Settings, config, device: str, world: int) -> int | None:
    """KV_CACHE_MEMORY_MB, else MAX_BATCH_TOTAL_TOKENS in bytes, else (CPU only) the default;
    None on a GPU: vLLM sizes it from CUDA_MEMORY_FRACTION (gpu_memory_utilization)."""
    if settings.kv_cache_memory_mb:
        return settings.kv_cache_memory_mb << 20
    if settings.max_batch_total_tokens:
        return settings.max_batch_total_tokens * kv_bytes_per_token(config, _dtype_bytes(settings, config), world)
    if device == "cpu":
        budget = psutil.virtual_memory().available * settings.cuda_memory_fraction * 0.5
        return int(min(budget, _CPU_DEFAULT_KV_BYTES))
    return None


def _quantization(settings: Settings) -> str | None:
    q = settings.quantize
    if q in _NOT_IN_VLLM:
        name = settings.sources.get("quantize", "HF_MODEL_QUANTIZE")
        raise SettingsError(f"{name}={q} is not available with ENGINE=vllm (vLLM 0.32 has no {q}); "
                            "serve a pre-quantized checkpoint (awq, gptq, fp8, compressed-tensors) or "
                            "quantize on load with fp8")
    return _VLLM_QUANTIZATION.get(q, q)


def engine_args(settings: Settings, model_path: str, config, device: str, world: int, lora: dict | None = None):
    """(AsyncEngineArgs, warning lines for flags vLLM's engine does not take); lora: the LoRA
    arguments (sagellm.engine.vllm.lora.engine_kwargs), which SM_VLLM_*/OPTION_* flags override."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = dict(
        model=model_path, tokenizer=model_path, trust_remote_code=settings.trust_remote_code,
        dtype=settings.dtype or "auto", tensor_parallel_size=world, max_model_len=settings.max_total_tokens,
        max_num_batched_tokens=settings.max_batch_prefill_tokens, max_num_seqs=settings.max_batch_size,
        enable_prefix_caching=settings.prefix_caching, quantization=_quantization(settings),
        kv_cache_memory_bytes=kv_cache_bytes(settings, config, device, world),
        max_logprobs=settings.max_top_n_tokens, seed=0,
        # Our grammars are llguidance's; this backend compiles them unchanged (params.structured_outputs).
        structured_outputs_config={"backend": "guidance"},
        disable_log_stats=True, enable_log_requests=False)
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = settings.cuda_memory_fraction
    kwargs.update(lora or {})
    flags, warnings = pass_through_args(settings.vllm_flags)
    kwargs.update(flags)
    return AsyncEngineArgs(**{k: v for k, v in kwargs.items() if v is not None}), warnings


def pass_through_args(flags) -> tuple[dict, list[str]]:
    """{AsyncEngineArgs field: value} for SM_VLLM_*/OPTION_* variables, parsed as `vllm serve`
    parses its flags; and one warning per variable that is not an engine argument."""
    if not flags:
        return {}, []
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    engine_parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm"))
    serve_options = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))._option_string_actions
    out, warnings = {}, []
    for name, text in flags.items():
        option = "--" + flag_of(name).replace("_", "-")
        action = engine_parser._option_string_actions.get(option)
        if action is None:
            if option in serve_options:
                warnings.append(f"{name}: `vllm serve {option}` configures vLLM's own HTTP server, "
                                "which sagellm replaces; not honoured")
            elif name.startswith(SM_VLLM):
                raise SettingsError(f"{name}: `vllm serve` has no {option} flag")
            else:
                warnings.append(f"{name} is not a vLLM engine argument; not honoured")
            continue
        argv = _argv(name, option, action, text)
        out[action.dest] = getattr(_parse(engine_parser, argv, name, text), action.dest)
    return out, warnings


def _argv(name: str, option: str, action: argparse.Action, text: str) -> list[str]:
    if action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction):
        if not text:
            raise SettingsError(f"{name} needs a value ({option} takes one)")
        return [option, text]
    on = True if not text else _boolean(name, text)
    if on:
        return [option]
    if isinstance(action, argparse.BooleanOptionalAction):  # --x false -> --no-x (and back)
        return ["--" + option[5:]] if option.startswith("--no-") else ["--no-" + option[2:]]
    return []


def _boolean(name: str, text: str) -> bool:
    try:
        return ev.boolean(text)
    except ValueError as e:
        raise SettingsError(f"{name}={text!r} is not {e}") from None


def _parse(parser, argv: list[str], name: str, text: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:  # argparse reports and exits; turn it into one start-up line
        detail = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "invalid"
        raise SettingsError(f"{name}={text!r} is not accepted by vLLM: {detail}") from None
