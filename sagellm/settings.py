"""The environment, read once into a frozen `Settings`: every variable, its aliases, parsing and checks."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from sagellm import env_values as ev
from sagellm import settings_vllm
from sagellm.errors import SettingsError


def _frozen_dict() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Settings:
    """The resolved configuration: build it with `Settings.from_env()`; `VARS` says where fields come from."""

    engine: str = "auto"  # auto | sagellm | vllm (sagellm.engine.choice resolves auto)
    model_id: str | None = None
    revision: str | None = None
    # Secrets stay out of repr(), so logging a Settings never leaks them; describe() masks them.
    hf_token: str | None = field(default=None, repr=False)
    trust_remote_code: bool = False
    quantize: str | None = None
    dtype: str | None = None  # None = "auto"
    num_shard: int = 1  # -1 = every visible device
    model_dir: str = "/opt/ml/model"
    cache_dir: str | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    prefix_caching: bool = True
    cpu_kernels: bool = True
    batch_invariant: bool = False
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 16
    max_top_n_tokens: int = 20
    max_best_of: int = 2
    max_choices: int = 8
    disable_grammar_support: bool = False
    grammar_compile_timeout_s: float = 10.0
    max_client_batch_size: int = 4
    payload_limit: int = 8_000_000
    messages_api_enabled: bool | None = None
    port: int = 8080
    bind_host: str = "0.0.0.0"
    served_model_name: str | None = None
    chat_template: str | None = None
    chat_template_file: str | None = None
    # Read-only so a frozen Settings can't be changed behind its back; hash=False as mappings don't hash.
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=_frozen_dict, hash=False)
    default_max_tokens: int | None = None
    request_timeout_s: float | None = None
    return_full_text: bool = True
    api_key: str | None = field(default=None, repr=False)
    responses_store_size: int = 1000
    responses_store_ttl_s: float = 3600.0
    cuda_memory_fraction: float = 0.9
    kv_cache_memory_mb: int | None = None
    graceful_termination_timeout: float = 25.0
    log_level: str = "info"
    log_prompts: bool = False
    compute_type: str | None = None
    watchdog_timeout_s: float = 60.0
    worker_threads: int | None = None
    # vLLM flags with no setting of our own, by the variable that set them (SM_VLLM_<FLAG>,
    # OPTION_<ARG>): name -> raw text; sagellm.engine.vllm.args hands them to vLLM's parser.
    vllm_flags: Mapping[str, str] = field(default_factory=_frozen_dict, hash=False)
    lora_adapters: tuple[tuple[str, str], ...] = ()  # (name, local folder or hub id)
    max_loras: int | None = None  # None: 8 when adapters are configured, else LoRA serving is off
    max_lora_rank: int = 64
    # Not environment variables: which variable supplied hf_token, and each field's source for describe().
    hf_token_source: str | None = None
    sources: Mapping[str, str] = field(default_factory=_frozen_dict, hash=False, repr=False)

    def __post_init__(self) -> None:
        # Tests build Settings(...) with plain dicts; keep the read-only promise for them too.
        for name in ("chat_template_kwargs", "sources", "vllm_flags"):
            value = getattr(self, name)
            if not isinstance(value, MappingProxyType):
                object.__setattr__(self, name, MappingProxyType(dict(value)))
        self._check_combinations()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for var in VARS:
            found = var.read(environ)
            if found is not None:
                sources[var.field], values[var.field] = found
        flags = settings_vllm.pass_through(environ, _CLAIMED)
        return cls(**values, vllm_flags=flags, hf_token_source=sources.get("hf_token"), sources=sources)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def describe(self) -> list[str]:
        """One line per variable for the start-up log, secrets masked."""
        lines = []
        for var in VARS:
            source = self.sources.get(var.field)
            origin = f"from {source}" if source else "default"
            lines.append(f"{var.field}={_show(var, getattr(self, var.field))} ({origin})")
        lines.extend(f"vllm flag --{settings_vllm.flag_of(name).replace('_', '-')}={raw!r} (from {name})"
                     for name, raw in self.vllm_flags.items())
        return lines

    def unhonoured(self, engine: str) -> list[str]:
        """One warning line per variable the user set that `engine` does not read."""
        return settings_vllm.unhonoured(self, engine)

    def _name(self, field_name: str) -> str:
        # Name the variable the user actually set (MAX_INPUT_LENGTH, not MAX_INPUT_TOKENS).
        return self.sources.get(field_name) or _BY_FIELD[field_name].names[0]

    def _check_combinations(self) -> None:
        """Checks that need no model; the model module checks the limits against the model itself."""
        inp, total, batch = self.max_input_tokens, self.max_total_tokens, self.max_batch_total_tokens
        if inp is not None and total is not None and inp >= total:
            raise SettingsError(
                f"{self._name('max_input_tokens')}={inp} must be less than "
                f"{self._name('max_total_tokens')}={total} (the total includes the generated tokens)"
            )
        if batch is not None and total is not None and batch < total:
            raise SettingsError(
                f"{self._name('max_batch_total_tokens')}={batch} must be at least "
                f"{self._name('max_total_tokens')}={total} (one full request must fit in a batch)"
            )


# --- parsing ---------------------------------------------------------------------------------
QUANTIZE_METHODS = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8", "awq", "gptq",
                    "eetq", "compressed-tensors", "marlin", "exl2") + settings_vllm.QUANTIZATIONS
ENGINES = ("auto", "sagellm", "vllm")
DTYPES = ("auto", "float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"auto": None, "fp32": "float32", "float": "float32", "fp16": "float16",
                  "half": "float16", "bf16": "bfloat16"}
LOG_LEVELS = ("debug", "info", "warning", "error")


# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Var:
    """One setting: its field, the variables that set it (first set wins), its type and meaning."""

    field: str
    names: tuple[str, ...]
    type: str
    parse: Callable[[str], Any]
    meaning: str
    secret: bool = False

    @property
    def default(self) -> Any:
        # The dataclass is the one place defaults live, so the table can't drift from it.
        spec = _FIELDS[self.field]
        return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default

    def read(self, environ: Mapping[str, str]) -> tuple[str, Any] | None:
        """(source name, value) from the first alias set, or None if none is; aliases must agree."""
        found: list[tuple[str, str, Any]] = []
        for name in self.names:
            raw = environ.get(name)
            if raw is None:
                continue
            text = ev.unquote(raw)
            if not text and self.type == "bool" and settings_vllm.is_bare_flag(name, raw):
                text = "true"  # AWS's vLLM container turns SM_VLLM_X= into a bare --x
            if not text:  # an empty value counts as unset
                continue
            try:
                value = self.parse(text)
            except ValueError as e:
                shown = "***" if self.secret else repr(raw)
                raise SettingsError(f"{name}={shown} is not {e}") from None
            found.append((name, raw, value))
        if not found:
            return None
        first_name, first_raw, first_value = found[0]
        for name, raw, value in found[1:]:
            if value != first_value:
                if self.secret:
                    raise SettingsError(f"{first_name} and {name} are set to different values; set only one")
                raise SettingsError(f"{first_name}={first_raw!r} and {name}={raw!r} disagree; set only one")
        return first_name, first_value


VARS: list[Var] = [
    Var("engine", ("ENGINE",), "one of " + ", ".join(ENGINES), ev.choice(ENGINES),
        "Which engine serves: sagellm (ours, the CPU default) or vllm (vLLM in process); auto: vllm when a "
        "CUDA device is visible and vLLM is installed, else sagellm"),
    Var("model_id", ("HF_MODEL_ID", "MODEL_ID", "SM_VLLM_MODEL", "OPTION_MODEL_ID"), "str", ev.text,
        "Hub id or local path of the model; unset: /opt/ml/model if it holds weights, "
        "else the bundled SmolLM2-135M-Instruct"),
    Var("revision", ("HF_MODEL_REVISION", "HF_REVISION", "REVISION", "SM_VLLM_REVISION", "OPTION_REVISION"),
        "str", ev.text,
        "Hub branch, tag or commit of the model"),
    Var("hf_token", ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN"), "str", ev.text,
        "Hugging Face token for gated or private models", secret=True),
    Var("trust_remote_code", ("HF_MODEL_TRUST_REMOTE_CODE", "TRUST_REMOTE_CODE", "SM_VLLM_TRUST_REMOTE_CODE",
                              "OPTION_TRUST_REMOTE_CODE"), "bool", ev.boolean,
        "Run the model repository's own Python code"),
    Var("quantize", ("HF_MODEL_QUANTIZE", "QUANTIZE", "SM_VLLM_QUANTIZATION", "OPTION_QUANTIZE",
                     "OPTION_QUANTIZATION"), "one of " + ", ".join(QUANTIZE_METHODS[:10]) + " (TGI's), or vLLM's",
        ev.choice(QUANTIZE_METHODS), "Quantization method (TGI's names, or vLLM's such as awq_marlin, torchao); "
        "unset: none, or what a pre-quantized checkpoint's config says (ENGINE=vllm)"),
    Var("dtype", ("DTYPE", "TORCH_DTYPE", "SM_VLLM_DTYPE", "OPTION_DTYPE"), "one of " + ", ".join(DTYPES),
        ev.choice(DTYPES, _DTYPE_ALIASES),
        "Weight dtype (fp32, fp16, bf16, half, float also accepted); unset: auto"),
    Var("num_shard", ("SM_NUM_GPUS", "NUM_SHARD", "TENSOR_PARALLEL_DEGREE", "SM_VLLM_TENSOR_PARALLEL_SIZE",
                      "OPTION_TENSOR_PARALLEL_DEGREE"), "int >= 1 or max",
        ev.num_shard, "Tensor-parallel degree; max: every visible device"),
    Var("model_dir", ("SM_MODEL_DIR",), "str", ev.text, "Where SageMaker puts model artifacts"),
    Var("cache_dir", ("SAGELLM_CACHE_DIR",), "str", ev.text,
        "Folder for the converted bundled model; unset: ~/.cache/sagellm"),
    Var("max_input_tokens", ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), "int >= 1", ev.positive_int,
        "Most prompt tokens per request; unset: derived from the model"),
    Var("max_total_tokens", ("MAX_TOTAL_TOKENS", "SM_VLLM_MAX_MODEL_LEN", "OPTION_MAX_MODEL_LEN"), "int >= 1",
        ev.positive_int,
        "Most prompt plus generated tokens per request; unset: derived from the model"),
    Var("max_batch_prefill_tokens", ("MAX_BATCH_PREFILL_TOKENS", "SM_VLLM_MAX_NUM_BATCHED_TOKENS",
                                      "OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS", "OPTION_MAX_NUM_BATCHED_TOKENS"),
        "int >= 1", ev.positive_int,
        "Most prompt tokens prefilled in one engine step; unset: derived (on CPU 512, 2,048 for a prompt alone in the engine)"),
    Var("max_batch_total_tokens", ("MAX_BATCH_TOTAL_TOKENS",), "int >= 1", ev.positive_int,
        "Most tokens held by all running requests together; unset: derived from memory"),
    Var("max_batch_size", ("MAX_BATCH_SIZE", "SM_VLLM_MAX_NUM_SEQS", "OPTION_MAX_ROLLING_BATCH_SIZE",
                            "OPTION_MAX_NUM_SEQS"), "int >= 1", ev.positive_int,
        "Most requests in one engine step; unset: limited by tokens only"),
    Var("prefix_caching", ("PREFIX_CACHING", "SM_VLLM_ENABLE_PREFIX_CACHING", "OPTION_ENABLE_PREFIX_CACHING"),
        "bool", ev.boolean,
        "Reuse the KV cache of prompts that start like an earlier one (whole 16-token blocks)"),
    Var("cpu_kernels", ("CPU_KERNELS",), "bool", ev.boolean,
        "On CPU, sagellm's fused AVX-512 kernels (built once with g++) for attention, RMSNorm, SwiGLU, "
        "rotary embedding and greedy picks; false: torch operators only"),
    Var("batch_invariant", ("BATCH_INVARIANT",), "bool", ev.boolean,
        "Greedy output bitwise the same whether a request runs alone or in any batch: every matmul on "
        "sagellm's row-invariant bf16 kernel (else oneDNN on 8-row tiles), prompt chunks on 64-token "
        "boundaries, one prefill attention path (CPU kernels)"),
    Var("max_concurrent_requests", ("MAX_CONCURRENT_REQUESTS",), "int >= 1", ev.positive_int,
        "Requests in flight before new ones get 429"),
    Var("max_stop_sequences", ("MAX_STOP_SEQUENCES",), "int >= 0", ev.non_negative_int,
        "Most stop sequences per request"),
    Var("max_top_n_tokens", ("MAX_TOP_N_TOKENS", "SM_VLLM_MAX_LOGPROBS", "OPTION_MAX_LOGPROBS"), "int >= 0",
        ev.non_negative_int,
        "Most top_n_tokens (alternative tokens per position) per request"),
    Var("max_best_of", ("MAX_BEST_OF",), "int >= 1", ev.positive_int, "Largest best_of per request"),
    Var("max_choices", ("MAX_CHOICES",), "int >= 1", ev.positive_int, "Largest `n` (choices) per chat/completions request"),
    Var("disable_grammar_support", ("DISABLE_GRAMMAR_SUPPORT",), "bool", ev.boolean,
        "Refuse grammar / response_format / tools that need constrained decoding"),
    Var("grammar_compile_timeout_s", ("GRAMMAR_COMPILE_TIMEOUT_S",), "float > 0", ev.positive_float,
        "A grammar or schema that takes longer to compile gets a 422"),
    Var("max_client_batch_size", ("MAX_CLIENT_BATCH_SIZE",), "int >= 1", ev.positive_int,
        "Most inputs in one request body"),
    Var("payload_limit", ("PAYLOAD_LIMIT",), "int >= 1", ev.positive_int, "Largest request body, in bytes"),
    Var("messages_api_enabled", ("MESSAGES_API_ENABLED", "OAI_ENABLED"), "bool", ev.boolean,
        "true: /invocations takes chat requests only; false: TGI native only; unset: the body decides"),
    Var("port", ("SAGEMAKER_BIND_TO_PORT", "PORT"), "int 1..65535", ev.port, "Port to listen on"),
    Var("bind_host", ("BIND_HOST",), "str", ev.text, "Address to listen on"),
    Var("served_model_name", ("SERVED_MODEL_NAME", "SM_VLLM_SERVED_MODEL_NAME", "OPTION_SERVED_MODEL_NAME"),
        "str", ev.text,
        "Model name reported to clients; unset: the model id"),
    Var("chat_template", ("CHAT_TEMPLATE",), "str", ev.text,
        "Jinja chat template replacing the tokenizer's"),
    Var("chat_template_file", ("CHAT_TEMPLATE_FILE",), "str", ev.text,
        "Path of a file holding the chat template"),
    Var("chat_template_kwargs", ("CHAT_TEMPLATE_KWARGS",), "JSON object", ev.json_object,
        "Extra variables passed to the chat template"),
    Var("default_max_tokens", ("DEFAULT_MAX_TOKENS",), "int >= 1", ev.positive_int,
        "Generated tokens when a request sets none; unset: the rest of the context"),
    Var("request_timeout_s", ("REQUEST_TIMEOUT_S",), "float > 0", ev.positive_float,
        "Seconds before a request is cancelled; unset: no limit"),
    Var("return_full_text", ("RETURN_FULL_TEXT",), "bool", ev.boolean,
        "Native requests return the prompt before the generated text unless they say otherwise"),
    Var("api_key", ("API_KEY", "SM_VLLM_API_KEY"), "str", ev.text,
        "If set, every route but /ping and /health needs `Authorization: Bearer <key>` (the key exact; "
        "on /v1/messages also x-api-key)", secret=True),
    Var("responses_store_size", ("RESPONSES_STORE_SIZE",), "int >= 0", ev.non_negative_int,
        "Responses API: most stored responses kept in memory for previous_response_id (oldest dropped)"),
    Var("responses_store_ttl_s", ("RESPONSES_STORE_TTL_S",), "float > 0", ev.positive_float,
        "Responses API: seconds a stored response is kept"),
    Var("cuda_memory_fraction", ("CUDA_MEMORY_FRACTION", "SM_VLLM_GPU_MEMORY_UTILIZATION",
                                  "OPTION_GPU_MEMORY_UTILIZATION"), "float in (0, 1]", ev.fraction,
        "Share of device memory (on CPU: available RAM) the KV cache may use; ENGINE=vllm on a GPU: vLLM's "
        "gpu_memory_utilization, its share of the whole GPU"),
    Var("kv_cache_memory_mb", ("KV_CACHE_MEMORY_MB",), "int >= 1", ev.positive_int,
        "KV cache size in MiB; overrides the fraction"),
    Var("graceful_termination_timeout", ("GRACEFUL_TERMINATION_TIMEOUT",), "float >= 0", ev.non_negative_float,
        "Seconds running requests get to finish on shutdown"),
    Var("log_level", ("LOG_LEVEL",), "one of " + ", ".join(LOG_LEVELS),
        ev.choice(LOG_LEVELS, {"warn": "warning"}), "Log verbosity (warn also accepted)"),
    Var("log_prompts", ("LOG_PROMPTS",), "bool", ev.boolean, "Log each request body (prompts included); off by default for privacy"),
    Var("compute_type", ("COMPUTE_TYPE",), "str", ev.text,
        "Value of the x-compute-type response header; unset: decided by the device"),
    Var("watchdog_timeout_s", ("WATCHDOG_TIMEOUT_S",), "float > 0", ev.positive_float,
        "/ping fails if no engine step completes for this long while work is queued"),
    Var("worker_threads", ("SAGELLM_THREADS",), "int >= 1", ev.positive_int,
        "gunicorn threads; unset: MAX_CONCURRENT_REQUESTS + 8"),
    Var("lora_adapters", ("LORA_ADAPTERS",), "name=path list", ev.lora_adapters,
        "LoRA adapters (peft folders or hub ids) to serve, comma-separated: name=path, or a bare path "
        "(named by its folder) or hub id (named by the id); folders under $SM_MODEL_DIR/adapters/ are added"),
    Var("max_loras", ("MAX_LORAS",), "int >= 1", ev.positive_int,
        "LoRA adapters resident at once (least recently used swapped out beyond it); setting it turns "
        "LoRA serving on with no adapter at start; unset: 8 when adapters are configured, else off"),
    Var("max_lora_rank", ("MAX_LORA_RANK",), "int >= 1", ev.positive_int,
        "Largest LoRA rank an adapter may have"),
]

_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_BY_FIELD = {var.field: var for var in VARS}
_CLAIMED = frozenset(name for var in VARS for name in var.names)


def _show(var: Var, value: Any) -> str:
    if value is None:
        return "(unset)"
    if var.secret:  # set or not, and not one character of it (a prefix narrows the search)
        return "***"
    if var.field == "num_shard" and value == -1:
        return "max"
    if isinstance(value, Mapping):
        return json.dumps(dict(value))
    if var.field == "lora_adapters":
        return ",".join(f"{name}={src}" for name, src in value) or "(none)"
    text = str(value)
    if "\n" in text or len(text) > 80:  # keep one line per setting (chat templates are long)
        return repr(text[:60] + "...")
    return text


def markdown_table() -> str:
    """Every variable as a markdown table, for the README."""
    rows = ["| Variable | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    for var in VARS:
        names = ", ".join(f"`{name}`" for name in var.names)
        default = var.default
        if default is None or default == ():
            shown = "unset"
        elif isinstance(default, Mapping):
            shown = f"`{json.dumps(dict(default))}`"
        else:
            shown = f"`{str(default).lower() if isinstance(default, bool) else default}`"
        cells = [names, var.type, shown, var.meaning]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
