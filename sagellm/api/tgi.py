"""TGI's native API: /generate, /generate_stream, POST / and native /invocations, /tokenize."""

from __future__ import annotations

import time

from sagellm.api.context import ServingContext
from sagellm.api.parse import parse
from sagellm.api.protocol import GenerateParameters, GenerateRequest
from sagellm.api.responses import SSE_HEADERS, JsonResponse, StreamResponse, event_stream, sse
from sagellm.api.sampling import build_params, check_common, invalid, resolve_max_new
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.errors import GenerationError


def _token(ev: TokenEvent) -> dict:
    return {"id": ev.token_id, "text": ev.text, "logprob": ev.logprob, "special": ev.special}


def _top(ev: TokenEvent) -> list[dict]:
    return [{"id": t.token_id, "text": t.text, "logprob": t.logprob, "special": t.special} for t in ev.top_tokens]


def prepare(ctx: ServingContext, req: GenerateRequest, has_parameters: bool, stream: bool):
    """Validate a native request and submit it; returns (handle, parameters, prompt_ids)."""
    s = ctx.settings
    p = req.parameters or GenerateParameters()
    stop = p.stop or []
    check_common(ctx, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, typical_p=p.typical_p,
                 repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
                 presence_penalty=p.presence_penalty, stop=stop, seed=p.seed,
                 max_new_name="max_new_tokens", max_new_tokens=p.max_new_tokens)
    if p.best_of is not None and p.best_of > 1:
        raise invalid("`best_of` > 1 is not supported by this server yet; send separate requests", "best_of")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= s.max_top_n_tokens:
        raise invalid(f"`top_n_tokens` must be >= 0 and <= {s.max_top_n_tokens}. Given: {p.top_n_tokens}",
                      "top_n_tokens")
    if stream and p.decoder_input_details:
        raise invalid("`decoder_input_details` == true is not supported when streaming tokens",
                      "decoder_input_details")
    if p.grammar is not None:
        raise invalid("`grammar` is not supported by this server yet", "grammar")
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
              or (p.top_p is not None and p.top_p < 1.0) or (p.typical_p is not None and p.typical_p < 1.0))
    do_sample = p.do_sample if p.do_sample is not None else (not has_parameters or warper)
    if p.temperature == 0:
        do_sample = False  # temperature 0 means greedy everywhere (TGI would refuse it)
    params = build_params(ctx, max_new_tokens=max_new, do_sample=do_sample, temperature=p.temperature,
                          top_k=p.top_k, top_p=p.top_p, typical_p=p.typical_p,
                          repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
                          presence_penalty=p.presence_penalty, stop=stop, seed=p.seed,
                          min_new_tokens=p.min_new_tokens, ignore_eos=p.ignore_eos,
                          top_n_tokens=p.top_n_tokens)
    return ctx.submit(ids, params), p, ids


def _details(ctx, handle, p: GenerateParameters, events: list[TokenEvent], finish: FinishReason) -> dict:
    d = {"finish_reason": finish.value, "generated_tokens": len(events), "seed": handle.seed,
         "prefill": [], "tokens": [_token(e) for e in events]}
    if p.top_n_tokens:
        d["top_tokens"] = [_top(e) for e in events]
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
    handle, p, ids = prepare(ctx, req, "parameters" in body and body["parameters"] is not None, False)
    t_valid = time.monotonic()
    try:
        events, finish = collect(handle)
    finally:
        handle.abort()  # no-op when finished; frees the slot if we were interrupted
    text = ctx.decode([e.token_id for e in events])
    full = p.return_full_text if p.return_full_text is not None else full_text_default
    out = {"generated_text": (req.inputs + text) if full else text}
    if p.details or p.decoder_input_details:
        out["details"] = _details(ctx, handle, p, events, finish)
    return JsonResponse(out, headers=timing_headers(ctx, t0, t_valid, len(ids), len(events), req.inputs))


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
    handle, p, ids = prepare(ctx, req, "parameters" in body and body["parameters"] is not None, True)
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
