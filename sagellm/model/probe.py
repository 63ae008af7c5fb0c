"""The start-up check that the engine implements every attention feature a model uses: one short
forward through transformers' modules and our paged attention records, per layer, the arguments
transformers hands the attention and the mask pattern it would apply; anything the paged attention
does not implement stops loading with one line naming the model type and the feature.

Written to refuse what it does not know rather than to list what it refuses: an argument a future
transformers release adds, a mask other than causal or a sliding window (chunked, bidirectional),
a layer whose attention never reaches our function, or K/V shapes the cache was not sized for.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from sagellm.errors import ModelLoadError
from sagellm.model import attention
from sagellm.model.attention import PrefillChunk, StepMetadata

PROBE_TOKENS = 8
# What paged_attention applies itself (the rest of its arguments are in IGNORED_ARGUMENTS).
IMPLEMENTED = frozenset({"scaling", "dropout", "sliding_window", "softcap", "s_aux"})
# Positions at which each layer's mask pattern is compared with ours, up to this many keys.
_PATTERN_LIMIT = 1 << 17
ADVICE = "sagellm's engine serves the model families listed in its README"

_mask_lock = threading.Lock()


class _MaskPattern:
    """What our mask interface hands the attention during the probe instead of a mask: the
    pattern transformers would apply, as its (batch, head, q_idx, kv_idx) -> bool function."""

    def __init__(self, function):
        self.function = function


@dataclass
class _ProbeCache:
    """What the paged attention reads of the engine's KV cache (sagellm.engine.kv_cache.PagedKVCache),
    for one block of PROBE_TOKENS slots: per layer, keys and values as [kv heads, slots, head dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block_size: int = PROBE_TOKENS
    num_blocks: int = 1

    @classmethod
    def zeros(cls, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> "_ProbeCache":
        def one() -> torch.Tensor:
            return torch.zeros(kv_heads, PROBE_TOKENS, head_dim, dtype=dtype, device=device)
        return cls([one() for _ in range(layers)], [one() for _ in range(layers)])


class Probe:
    """Filled by paged_attention during the probe forward: one entry per call."""

    def __init__(self):
        self.thread = threading.get_ident()
        self.calls: list[dict] = []

    def record(self, module, query, key, attention_mask, arguments: dict) -> None:
        self.calls.append(dict(layer=getattr(module, "layer_idx", None), causal=getattr(module, "is_causal", True),
                               heads=query.shape[1], kv_heads=key.shape[1], head_dim=key.shape[-1],
                               mask=attention_mask, arguments=arguments))

    def mask_interface(self, mask_function=None, **_):
        # Registered for our attention while probing; other threads (another model's engine in
        # the same process) get what transformers gives custom attention: no mask at all.
        return _MaskPattern(mask_function) if threading.get_ident() == self.thread else None


def check(model, kernels, device, tp_size: int = 1) -> list[dict]:
    """Run the probe; returns, per layer, the attention arguments the model passes (for the fast
    decoder), or raises ModelLoadError naming what is not implemented."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kind = getattr(model.config, "model_type", type(model).__name__)
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    def refuse(feature: str) -> ModelLoadError:
        return ModelLoadError(f"model type {kind}: {feature}; {ADVICE}")

    probe = Probe()
    cache = _ProbeCache.zeros(layers, kv_heads // tp_size, head_dim, model.dtype, device)
    ids = torch.tensor([[(7919 * i + 11) % cfg.vocab_size for i in range(PROBE_TOKENS)]], device=device)
    positions = torch.arange(PROBE_TOKENS, device=device)
    keep = torch.tensor([2, PROBE_TOKENS - 1], device=device)
    meta = StepMetadata(cache=cache, slot_mapping=positions, num_decode=0, decode_blocks=None, decode_bias=None,
                        prefills=[PrefillChunk(0, PROBE_TOKENS, 0, None, None)], kernels=kernels, probe=probe)
    with _mask_lock:
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[attention.ATTN_IMPLEMENTATION] = probe.mask_interface
        try:
            with torch.inference_mode():
                logits = model(input_ids=ids, position_ids=positions[None], use_cache=False,
                               logits_to_keep=keep, sagellm_meta=meta).logits
        except Exception as exc:  # noqa: BLE001 - whatever broke, the model cannot be served as it is
            # The recorded calls usually say why (a K/V shape the cache was not sized for, ...).
            problem = next(filter(None, (_problem(c, kv_heads // tp_size, head_dim) for c in probe.calls)), None)
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise refuse(problem or f"its forward fails under sagellm's paged attention ({type(exc).__name__}: "
                         f"{first})") from exc
        finally:
            del ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[attention.ATTN_IMPLEMENTATION]

    if logits.shape[-2] != len(keep):
        raise refuse("its forward ignores logits_to_keep (the engine needs only the rows it samples)")
    by_layer: dict[int, dict] = {}
    for call in probe.calls:
        problem = _problem(call, kv_heads // tp_size, head_dim)
        if problem:
            raise refuse(problem)
        if call["layer"] in by_layer:
            raise refuse(f"layer {call['layer']} calls attention more than once a forward")
        by_layer[call["layer"]] = call
    missing = sorted(set(range(layers)) - set(by_layer))
    if missing or len(by_layer) != layers:
        raise refuse(f"the attention of layer(s) {missing or sorted(by_layer)} does not go through "
                     f"transformers' attention interface (so not through sagellm's KV cache)")
    limit = min(getattr(cfg, "max_position_embeddings", None) or 4096, _PATTERN_LIMIT)
    seen: set[tuple[int, int]] = set()
    for layer, call in sorted(by_layer.items()):
        window = call["arguments"]["sliding_window"] or 0
        if (id(call["mask"]), window) not in seen:
            problem = _pattern_problem(call["mask"], window, limit)
            if problem:
                raise refuse(f"layer {layer}'s attention mask {problem}")
            seen.add((id(call["mask"]), window))
    return [{k: by_layer[i]["arguments"][k] for k in ("scaling", "sliding_window", "softcap", "s_aux")}
            for i in range(layers)]


def _problem(call: dict, kv_heads: int, head_dim: int) -> str | None:
    """What in one recorded call the paged attention does not implement, or None."""
    args = call["arguments"]
    unknown = sorted(k for k in args if k not in IMPLEMENTED | attention.IGNORED_ARGUMENTS)
    if unknown:
        return f"its attention passes argument(s) {unknown}, which sagellm's paged attention does not implement"
    if call["layer"] is None:
        return "its attention modules have no layer_idx (the KV cache is indexed by layer)"
    if args["dropout"]:
        return f"attention dropout {args['dropout']} is on at inference"
    if call["causal"] is not True:
        return "its attention is not causal (is_causal is False)"
    if (call["kv_heads"], call["head_dim"]) != (kv_heads, head_dim):
        return (f"layer {call['layer']} has {call['kv_heads']} KV heads of {call['head_dim']} dims, not the "
                f"{kv_heads} of {head_dim} its configuration gives (the KV cache is sized from it)")
    window = args["sliding_window"]
    if window is not None and (not isinstance(window, int) or window < 1):
        return f"sliding_window={window!r} is not a positive integer"
    sinks = args["s_aux"]
    if sinks is not None and tuple(sinks.shape) != (call["heads"],):
        return (f"its attention sinks have shape {tuple(sinks.shape)}, not one per query head "
                f"({call['heads']}); with tensor parallelism they are not split with the heads, use SM_NUM_GPUS=1")
    softcap = args["softcap"]
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        return f"softcap={softcap!r} is not a positive number"
    return None


def _pattern_problem(mask, window: int, limit: int) -> str | None:
    """Whether the mask transformers would apply is causal, within `window` if non-zero, at every
    sampled query position up to `limit` keys: None if so, else what differs."""
    if not isinstance(mask, _MaskPattern) or mask.function is None:
        return ("was not built by transformers' masking utilities, so its pattern cannot be checked "
                f"(got {type(mask).__name__})")
    rows = set(range(16)) | {limit - 1} | {2 ** k + d for k in range(4, 17) for d in (-1, 0, 1)}
    if window:
        rows |= {window + d for d in range(-2, 3)} | {2 * window + d for d in (-1, 0, 1)}
    q = torch.tensor(sorted(r for r in rows if 0 <= r < limit)).view(1, 1, -1, 1)
    kv = torch.arange(limit).view(1, 1, 1, -1)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    try:
        got = torch.as_tensor(mask.function(zero, zero, q, kv)).expand(1, 1, q.shape[2], limit)
    except Exception as exc:  # noqa: BLE001 - a pattern we cannot evaluate is one we cannot check
        return f"pattern cannot be evaluated ({type(exc).__name__}: {exc})"
    want = (kv <= q) & ((kv > q - window) if window else True)
    if torch.equal(got.bool(), want.expand_as(got)):
        return None
    r = int((got.bool() != want).nonzero()[0, 2])
    visible = got[0, 0, r].nonzero().flatten()
    span = f"{int(visible[0])}..{int(visible[-1])}" if len(visible) else "none"
    expected = f"{max(0, int(q[0, 0, r, 0]) - window + 1) if window else 0}..{int(q[0, 0, r, 0])}"
    return (f"is not {'a sliding window of ' + str(window) if window else 'causal'}: query {int(q[0, 0, r, 0])} "
            f"sees keys {span}, not {expected} (chunked, bidirectional or other patterns are not implemented)")
