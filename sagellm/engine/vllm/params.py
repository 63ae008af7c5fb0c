"""Our SamplingParams as vLLM's, and the refusals (422, before submission) for what vLLM cannot
do the way sagellm's own engine does it."""

from __future__ import annotations

import json

from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import ValidationError

ENGINE = "ENGINE=vllm"
# vLLM raises a sampling temperature below this to it, with only a log line
# (vllm.sampling_params._MAX_TEMP), and refuses one above the maximum.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0


def _refuse(message: str, param: str) -> ValidationError:
    return ValidationError(f"Input validation error: {message} with {ENGINE}", param=param)


def check_supported(p: SamplingParams) -> None:
    """Raise for a field vLLM would ignore or change."""
    if p.max_new_tokens == 0:
        raise _refuse("`max_tokens` 0 (scoring the prompt without generating) is not supported", "max_tokens")
    if p.prompt_top_n:
        raise _refuse("`logprobs` alternatives for echoed prompt tokens are not supported", "logprobs")
    if p.typical_p != 1.0:
        raise _refuse("`typical_p` (typical sampling) is not supported", "typical_p")
    if p.do_sample and p.temperature > MAX_TEMPERATURE:
        raise _refuse(f"`temperature` must be <= {MAX_TEMPERATURE:g}. Given: {p.temperature:g}", "temperature")
    if p.do_sample and 0 < p.temperature < MIN_TEMPERATURE:
        raise _refuse(f"`temperature` must be 0 (greedy) or >= {MIN_TEMPERATURE:g}. Given: {p.temperature:g}",
                      "temperature")


def to_vllm(p: SamplingParams, vocab_size: int):
    """vLLM's SamplingParams for ours. Stop strings and stop_token_ids are not handed over: the
    request's own detokenizer and stop matcher (sagellm.engine.vllm.request) end it exactly as
    sagellm's engine does, so vLLM detokenizes nothing."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VllmSamplingParams

    min_tokens, ignore_eos = p.min_new_tokens, p.ignore_eos
    if p.grammar is not None:
        # The grammar decides when the output may end; min_tokens/ignore_eos cannot override it.
        min_tokens, ignore_eos = 0, False
    elif ignore_eos:
        # vLLM's ignore_eos only keeps going past an EOS; ours never picks one. min_tokens bans
        # EOS until then, so with max_tokens it bans it for the whole request.
        min_tokens = p.max_new_tokens
    return VllmSamplingParams(
        n=1,
        max_tokens=p.max_new_tokens,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        temperature=p.temperature if p.do_sample else 0.0,
        top_k=p.top_k if p.do_sample and p.top_k < vocab_size else 0,
        top_p=p.top_p if p.do_sample else 1.0,
        seed=p.seed if p.do_sample else None,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        logit_bias=dict(p.logit_bias) or None,
        # logprobs=k reports the chosen token and the k best (0: the chosen one only).
        logprobs=p.top_n_tokens if p.top_n_tokens else (0 if p.logprobs else None),
        prompt_logprobs=0 if p.prompt_logprobs else None,
        structured_outputs=structured_outputs(p.grammar) if p.grammar is not None else None,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


def structured_outputs(grammar):
    """The same llguidance grammar our compiler built (sagellm.engine.constraint.Grammar.source),
    for vLLM's `guidance` backend. A JSON schema goes as `json`: its x-guidance options (compact
    separators, no free whitespace) take precedence over vLLM's defaults, so llguidance compiles
    the same grammar; anything else goes as the Lark text."""
    from llguidance.gbnf_to_lark import is_lark_syntax
    from vllm.sampling_params import StructuredOutputsParams

    source = grammar.source
    if source.lstrip().startswith("{"):  # llguidance's JSON form: {"grammars": [{...}]}
        (part,) = json.loads(source)["grammars"]
        if part.get("json_schema") is not None:
            return StructuredOutputsParams(json=part["json_schema"])
        source = part["lark_grammar"]
    if not is_lark_syntax(source):
        # vLLM would take it for GBNF and convert it; this declaration marks it as Lark.
        source = "%llguidance {}\n" + source
    return StructuredOutputsParams(grammar=source)
