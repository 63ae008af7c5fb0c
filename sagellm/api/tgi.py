"""TGI's native API: /generate, /generate_stream, POST / and native /invocations, /tokenize."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from sagellm.api.context import ServingContext
from sagellm.api.parse import parse
from sagellm.api.protocol import GenerateParameters, GenerateRequest
from sagellm.api.responses import SSE_HEADERS, JsonResponse, StreamResponse, event_stream, sse
from sagellm.api.sampling import build_params, check_common, invalid, resolve_max_new
from sagellm.api.structured import grammar_for
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import GenerationError


def _token(ev: TokenEvent) -> dict:
    return {"id": ev.token_id, "text": ev.text, "logprob": ev.logprob, "special": ev.special}


def _top(ev: TokenEvent) -> list[dict]:
    return [{"id": t.token_id, "text": t.text, "logprob": t.logprob, "special": t.special} for t in ev.top_tokens]


def _best_of(ctx: ServingContext, p: GenerateParameters, stream: bool) -> int:
    """TGI's best_of rules; the messages are TGI's, with the limit's variable named."""
    n = p.best_of if p.best_of is not None else 1
    limit = ctx.settings.max_best_of
    if n == 1:
        return 1
    if stream:
        raise invalid("`best_of` != 1 is not supported when streaming tokens", "best_of")
    if limit == 1:
        raise invalid("`best_of` != 1 is not allowed for this endpoint (MAX_BEST_OF=1)", "best_of")
    if not 0 < n <= limit:
        raise invalid(f"`best_of` must be > 0 and <= {limit}. Given: {n} (MAX_BEST_OF={limit})", "best_of")
    # TGI counts any warper field as asking for sampling, even next to do_sample=false.
    sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p))
    if not sampling or p.temperature == 0:
        raise invalid("you must use sampling when `best_of` is > 1", "best_of")
    return n


def prepare(ctx: ServingContext, req: GenerateRequest, has_parameters: bool, stream: bool):
    """Validate a native request; returns (sampling params, parameters, prompt_ids, best_of)."""
    s = ctx.settings
    p = req.parameters or GenerateParameters()
    stop = p.stop or []
    check_common(ctx, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, typical_p=p.typical_p,
                 repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
                 presence_penalty=p.presence_penalty, stop=stop, seed=p.seed,
                 max_new_name="max_new_tokens", max_new_tokens=p.max_new_tokens, min_p=p.min_p)
    best_of = _best_of(ctx, p, stream)
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= s.max_top_n_tokens:
        raise invalid(f"`top_n_tokens` must be >= 0 and <= {s.max_top_n_tokens}. Given: {p.top_n_tokens}",
                      "top_n_tokens")
    if stream and p.decoder_input_details:
        raise invalid("`decoder_input_details` == true is not supported when streaming tokens",
                      "decoder_input_details")
    if not req.inputs:
        raise invalid("`inputs` cannot be empty", "inputs")
    ids = ctx.tokenize(req.inputs, True)
    if p.truncate is not None:
        if not 0 < p.truncate <= ctx.max_input_tokens:
            raise invalid(f"`truncate` must be strictly positive and less than {ctx.max_input_tokens}. "
                          f"Given: {p.truncate}", "truncate")
        ids = ids[-p.truncate:]
    max_new = resolve_max_new(ctx, len(ids), p.max_new_tokens, inputs_name="inputs",
                              max_new_name="max_new_tokens")
    warper = ((p.temperature is not None and p.temperature != 1.0) or bool(p.top_k and p.top_k > 0)
              or (p.top_p is not None and p.top_p < 1.0) or (p.typical_p is not None and p.typical_p < 1.0)
              or bool(p.min_p))
    do_sample = p.do_sample if p.do_sample is not None else (not has_parameters or warper)
    if p.temperature == 0:
        do_sample = False  # temperature 0 means greedy everywhere (TGI would refuse it)
    params = build_params(ctx, max_new_tokens=max_new, do_sample=do_sample or best_of > 1,
                          temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, typical_p=p.typical_p,
                          repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
                          presence_penalty=p.presence_penalty, stop=stop, seed=p.seed,
                          min_new_tokens=p.min_new_tokens, ignore_eos=p.ignore_eos,
                          top_n_tokens=p.top_n_tokens, logprobs=True,
                          prompt_logprobs=bool(p.decoder_input_details))
    grammar = grammar_for(ctx, p.grammar, "grammar")
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    return params, p, ids, best_of


def submit_best_of(ctx: ServingContext, ids: list[int], params: SamplingParams, best_of: int) -> list:
    """All `best_of` sequences at once, so they share the running batch. A given seed becomes
    seed, seed + 1, ... (else the copies would be identical); without one each gets its own."""
    if best_of == 1:
        return [ctx.submit(ids, params)]
    seeds = [None] * best_of if params.seed is None else [(params.seed + i) % 2**64 for i in range(best_of)]
    return [ctx.submit(ids, dataclasses.replace(params, seed=seed)) for seed in seeds]


@dataclass
class Generation:
    """One finished sequence of a native request."""

    seed: int | None
    events: list[TokenEvent]
    finish: FinishReason

    @property
    def mean_logprob(self) -> float:
        """TGI's best_of score: the mean (not the sum) of the generated tokens' logprobs."""
        return sum(e.logprob or 0.0 for e in self.events) / len(self.events)


def _details(g: Generation, p: GenerateParameters) -> dict:
    prompt = g.events[0].prompt_logprobs or []
    d = {"finish_reason": g.finish.value, "generated_tokens": len(g.events), "seed": g.seed,
         "prefill": [{"id": t.token_id, "text": t.text, "logprob": t.logprob} for t in prompt],
         "tokens": [_token(e) for e in g.events]}
    if p.top_n_tokens:
        d["top_tokens"] = [_top(e) for e in g.events]
    return d


def collect(handle) -> tuple[list[TokenEvent], FinishReason]:
    events: list[TokenEvent] = []
    for ev in handle.iter_events():
        if ev is None:
            continue
        if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
            raise GenerationError(f"Request failed during generation: {ev.error or 'aborted'}")
        events.append(ev)
        if ev.finish_reason is not None:
            return events, ev.finish_reason
    raise GenerationError("Incomplete generation")


def generate(ctx: ServingContext, body, *, full_text_default: bool) -> JsonResponse:
    """Non-streaming native generation; the caller wraps the object in a list for POST / and /invocations."""
    t0 = time.monotonic()
    req = parse(GenerateRequest, body)
    params, p, ids, best_of = prepare(ctx, req, "parameters" in body and body["parameters"] is not None, False)
    handles = submit_best_of(ctx, ids, params, best_of)
    t_valid = time.monotonic()
    try:
        gens = [Generation(h.seed, *collect(h)) for h in handles]
    finally:
        for h in handles:
            h.abort()  # no-op when finished; frees the others when one failed or the client left
    best = max(gens, key=lambda g: g.mean_logprob)
    full = p.return_full_text if p.return_full_text is not None else full_text_default

    def text_of(g: Generation) -> str:
        text = ctx.decode([e.token_id for e in g.events])
        return (req.inputs + text) if full else text

    out = {"generated_text": text_of(best)}
    if p.details or p.decoder_input_details:
        out["details"] = _details(best, p)
        if best_of > 1:
            out["details"]["best_of_sequences"] = [{"generated_text": text_of(g), **_details(g, p)}
                                                   for g in gens if g is not best]
    return JsonResponse(out, headers=timing_headers(ctx, t0, t_valid, len(ids), len(best.events), req.inputs))


def timing_headers(ctx, t0: float, t_valid: float, n_in: int, n_out: int, text: str) -> dict:
    now = time.monotonic()
    total_ms, infer_ms = int((now - t0) * 1000), int((now - t_valid) * 1000)
    return {
        "x-compute-type": ctx.settings.compute_type or ("gpu+optimized" if ctx.device == "cuda" else "cpu"),
        "x-compute-time": f"{now - t0:.3f}", "x-compute-characters": str(len(text)),
        "x-total-time": str(total_ms), "x-validation-time": str(int((t_valid - t0) * 1000)),
        "x-queue-time": "0", "x-inference-time": str(infer_ms),
        "x-time-per-token": str(infer_ms // max(n_out, 1)),
        "x-prompt-tokens": str(n_in), "x-generated-tokens": str(n_out),
    }


def generate_stream(ctx: ServingContext, body, *, full_text_default: bool) -> StreamResponse:
    """SSE: one event per token; the last one carries generated_text (and details if asked)."""
    req = parse(GenerateRequest, body)
    params, p, ids, _ = prepare(ctx, req, "parameters" in body and body["parameters"] is not None, True)
    handle = ctx.submit(ids, params)
    full = p.return_full_text if p.return_full_text is not None else full_text_default
    generated: list[int] = []

    def render(ev: TokenEvent) -> list[bytes]:
        if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
            return [sse({"error": f"Request failed during generation: {ev.error or 'aborted'}",
                         "error_type": "generation"})]
        generated.append(ev.token_id)
        out = {"index": ev.index, "token": _token(ev)}
        if p.top_n_tokens:
            out["top_tokens"] = _top(ev)
        out["generated_text"] = None
        out["details"] = None
        if ev.finish_reason is not None:
            text = ctx.decode(generated)
            out["generated_text"] = (req.inputs + text) if full else text
            if p.details:
                out["details"] = {"finish_reason": ev.finish_reason.value, "generated_tokens": len(generated),
                                  "seed": handle.seed, "input_length": len(ids)}
        return [sse(out)]

    headers = {**SSE_HEADERS, "x-compute-type": ctx.settings.compute_type or ctx.device,
               "x-compute-characters": str(len(req.inputs))}
    return StreamResponse(event_stream(handle, render), headers)


def tokenize(ctx: ServingContext, body) -> JsonResponse:
    req = parse(GenerateRequest, body)
    if not req.inputs:
        raise invalid("`inputs` cannot be empty", "inputs")
    raw = req.inputs
    out = []
    for tid, start, end in ctx.tokenize_offsets(raw):
        b_start, b_end = len(raw[:start].encode()), len(raw[:end].encode())
        out.append({"id": tid, "text": raw[start:end], "start": b_start, "stop": b_end})
    if req.parameters and req.parameters.truncate:
        out = out[-req.parameters.truncate:]
    return JsonResponse(out)
