"""Request fields -> SamplingParams, with the checks and messages shared by every route: TGI's
parameters (tgi.py) and the OpenAI fields of chat and completions requests."""

from __future__ import annotations

import math
import time

from sagellm.api import adapters
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import invalid
from sagellm.api.protocol import OpenAISampling
from sagellm.engine.sampling_params import SamplingParams


MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# A temperature this small is greedy decoding (vLLM's threshold too): dividing by it overflows.
GREEDY_TEMPERATURE = 1e-5


def check_common(ctx: ServingContext, *, temperature, top_p, top_k, typical_p, repetition_penalty,
                 frequency_penalty, presence_penalty, stop: list[str], seed, max_new_name: str,
                 max_new_tokens, zero_ok: bool = False, min_p=None) -> None:
    """zero_ok: max_new_tokens 0 is allowed (completions with echo: score the prompt only)."""
    s = ctx.settings
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p), ("typical_p", typical_p),
                        ("repetition_penalty", repetition_penalty), ("frequency_penalty", frequency_penalty),
                        ("presence_penalty", presence_penalty)):
        if value is not None and not math.isfinite(value):
            raise invalid(f"`{name}` must be a finite number. Given: {value}", name)
    if temperature is not None and temperature < 0:
        raise invalid("`temperature` must be >= 0", "temperature")
    # Dividing logits by a penalty near 0 overflows them to inf (then NaN probabilities); past
    # these bounds a penalty has long stopped changing which token wins.
    if repetition_penalty is not None and not MIN_REPETITION_PENALTY <= repetition_penalty <= MAX_REPETITION_PENALTY:
        raise invalid(f"`repetition_penalty` must be >= {MIN_REPETITION_PENALTY} and <= {MAX_REPETITION_PENALTY}. "
                      f"Given: {repetition_penalty}", "repetition_penalty")
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if value is not None and not -2.0 <= value <= 2.0:
            raise invalid(f"`{name}` must be >= -2.0 and <= 2.0. Given: {value}", name)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise invalid(f"`top_p` must be > 0.0 and <= 1.0. Given: {top_p}", "top_p")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise invalid(f"`min_p` must be >= 0.0 and <= 1.0. Given: {min_p}", "min_p")
    if typical_p is not None and not 0.0 < typical_p <= 1.0:
        raise invalid(f"`typical_p` must be > 0.0 and <= 1.0. Given: {typical_p}", "typical_p")
    if top_k is not None and top_k < -1:
        raise invalid(f"`top_k` must be positive (0 or -1 turn it off). Given: {top_k}", "top_k")
    if max_new_tokens is not None and max_new_tokens < (0 if zero_ok else 1):
        raise invalid(f"`{max_new_name}` must be {'>= 0' if zero_ok else 'strictly positive'}. "
                      f"Given: {max_new_tokens}", max_new_name)
    if len(stop) > s.max_stop_sequences:
        raise invalid(f"`stop` supports up to {s.max_stop_sequences} stop sequences. Given: {len(stop)}"
                      " (raise MAX_STOP_SEQUENCES to allow more)", "stop")
    if seed is not None and not 0 <= seed < 2**64:
        raise invalid(f"`seed` must be >= 0 and < 2**64. Given: {seed}", "seed")


def resolve_max_new(ctx: ServingContext, prompt_len: int, requested: int | None, *,
                    inputs_name: str, max_new_name: str) -> int:
    """Checks the prompt against the limits; the default is the rest of the context."""
    lim_in, lim_total = ctx.engine.limits.max_input_tokens, ctx.engine.limits.max_total_tokens
    if prompt_len > lim_in:
        raise invalid(f"`{inputs_name}` must have less than {lim_in + 1} tokens. Given: {prompt_len}"
                      f" (MAX_INPUT_TOKENS={lim_in})", inputs_name)
    if requested is None:
        room = lim_total - prompt_len
        cap = ctx.settings.default_max_tokens
        return max(1, min(room, cap) if cap else room)
    if prompt_len + requested > lim_total:
        raise invalid(f"`{inputs_name}` tokens + `{max_new_name}` must be <= {lim_total}. Given: "
                      f"{prompt_len} `{inputs_name}` tokens and {requested} `{max_new_name}`"
                      f" (MAX_TOTAL_TOKENS={lim_total})", max_new_name)
    return requested


def build_params(ctx: ServingContext, *, max_new_tokens: int, do_sample: bool, temperature, top_k,
                 top_p, min_p=None, typical_p=None, repetition_penalty=None, frequency_penalty=None,
                 presence_penalty=None, stop=(), seed=None, logit_bias=(), min_new_tokens=None,
                 ignore_eos=None, top_n_tokens=0, logprobs=True, prompt_logprobs=False,
                 adapter=None) -> SamplingParams:
    timeout = ctx.settings.request_timeout_s
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if temperature is not None and temperature >= GREEDY_TEMPERATURE else 1.0,
        top_k=top_k if top_k and top_k > 0 else 0,
        top_p=top_p if top_p is not None else 1.0,
        min_p=min_p or 0.0,
        typical_p=typical_p if typical_p is not None else 1.0,
        repetition_penalty=repetition_penalty if repetition_penalty is not None else 1.0,
        frequency_penalty=frequency_penalty or 0.0,
        presence_penalty=presence_penalty or 0.0,
        logit_bias=tuple(logit_bias),
        seed=seed,
        stop=tuple(stop),
        ignore_eos=bool(ignore_eos),
        min_new_tokens=min(min_new_tokens or 0, max_new_tokens),
        top_n_tokens=top_n_tokens or 0,
        logprobs=logprobs,
        deadline=time.monotonic() + timeout if timeout else None,
        prompt_logprobs=prompt_logprobs,
        adapter=adapter,
    )


def openai_params(ctx: ServingContext, req: OpenAISampling, prompt_len: int, inputs_name: str,
                  top_n: int = 0, logprobs: bool = False, zero_ok: bool = False) -> SamplingParams:
    """The sampling fields chat and completions requests share; temperature 0 means greedy;
    zero_ok as in check_common."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    requested = next((v for v in (req.max_completion_tokens, req.max_tokens, req.max_new_tokens)
                      if v is not None), None)
    name = ("max_completion_tokens" if req.max_completion_tokens is not None else
            "max_tokens" if req.max_tokens is not None else "max_new_tokens")
    check_common(ctx, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, typical_p=None,
                 repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                 presence_penalty=req.presence_penalty, stop=stop, seed=req.seed, max_new_name=name,
                 max_new_tokens=requested, zero_ok=zero_ok, min_p=req.min_p)
    if req.min_tokens is not None and req.min_tokens < 0:
        raise invalid(f"`min_tokens` must be >= 0. Given: {req.min_tokens}", "min_tokens")
    bias = logit_bias(ctx, req.logit_bias)
    max_new = resolve_max_new(ctx, prompt_len, requested, inputs_name=inputs_name, max_new_name=name)
    greedy = req.temperature is not None and req.temperature < GREEDY_TEMPERATURE
    adapter = adapters.for_openai(ctx, req.model)
    return build_params(ctx, max_new_tokens=max_new, do_sample=not greedy,
                        temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                        repetition_penalty=req.repetition_penalty, frequency_penalty=req.frequency_penalty,
                        presence_penalty=req.presence_penalty, stop=stop, seed=req.seed, logit_bias=bias,
                        min_new_tokens=req.min_tokens, ignore_eos=req.ignore_eos, top_n_tokens=top_n,
                        logprobs=logprobs, adapter=adapter)


def logit_bias(ctx: ServingContext, given: dict[str, float] | None) -> list[tuple[int, float]]:
    """OpenAI's {"token id": bias}: ids as plain ASCII digits, inside the model's vocabulary."""
    vocab = ctx.engine.model.vocab_size or 2**31
    bias = []
    for key, value in (given or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise invalid(f"`logit_bias` keys must be token ids >= 0 and < {vocab} (the vocabulary size). "
                          f"Given: {key!r}", "logit_bias")
        if not -100 <= value <= 100:
            raise invalid(f"`logit_bias` values must be >= -100 and <= 100. Given: {value}", "logit_bias")
        bias.append((int(key), float(value)))
    return bias


def check_n(ctx: ServingContext, n: int | None) -> int:
    """The number of choices an OpenAI request asks for."""
    if n is not None and not 1 <= n <= ctx.settings.max_choices:
        raise invalid(f"`n` must be >= 1 and <= {ctx.settings.max_choices}. Given: {n} (MAX_CHOICES)", "n")
    return n or 1
