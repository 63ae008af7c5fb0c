"""TGI's native API: /generate, /generate_stream, POST / and native /invocations, /tokenize."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from sagellm.api import adapters
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import error_event, generation_failed, invalid, stream_failure
from sagellm.api.parse import parse
from sagellm.api.protocol import GenerateParameters, GenerateRequest
from sagellm.api.protocol_tgi import (BestOfSequence, Details, GenerateResponse, PrefillToken, StreamChunk,
                                      StreamDetails, Token, TokenizedToken)
from sagellm.api.responses import SSE_HEADERS, JsonResponse, StreamResponse, event_stream, sse
from sagellm.api.prompt_tokens import tokenize_bounded
from sagellm.api.sampling import GREEDY_TEMPERATURE, build_params, check_common, resolve_max_new
from sagellm.api.structured import grammar_for
from sagellm.api.submit import collect, submit_n
from sagellm.engine.events import FinishReason, TokenEvent


def _token(ev: TokenEvent) -> Token:
    return Token(id=ev.token_id, text=ev.text, logprob=ev.logprob, special=ev.special)


def _top(ev: TokenEvent) -> list[Token]:
    return [Token(id=t.token_id, text=t.text, logprob=t.logprob, special=t.special) for t in ev.top_tokens]


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
    if not sampling or (p.temperature is not None and p.temperature < GREEDY_TEMPERATURE):
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
    adapter = adapters.for_native(ctx, p.adapter_id)
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= s.max_top_n_tokens:
        raise invalid(f"`top_n_tokens` must be >= 0 and <= {s.max_top_n_tokens}. Given: {p.top_n_tokens}",
                      "top_n_tokens")
    if stream and p.decoder_input_details:
        raise invalid("`decoder_input_details` == true is not supported when streaming tokens",
                      "decoder_input_details")
    if not req.inputs:
        raise invalid("`inputs` cannot be empty", "inputs")
    ids = tokenize_bounded(ctx, req.inputs, "inputs", ctx.engine.limits.max_input_tokens, truncate=p.truncate)
    max_new = resolve_max_new(ctx, len(ids), p.max_new_tokens, inputs_name="inputs",
                              max_new_name="max_new_tokens")
    warper = ((p.temperature is not None and p.temperature != 1.0) or bool(p.top_k and p.top_k > 0)
              or (p.top_p is not None and p.top_p < 1.0) or (p.typical_p is not None and p.typical_p < 1.0)
              or bool(p.min_p))
    do_sample = p.do_sample if p.do_sample is not None else (not has_parameters or warper)
    if p.temperature is not None and p.temperature < GREEDY_TEMPERATURE:
        do_sample = False  # temperature 0 means greedy everywhere (TGI would refuse it)
    params = build_params(ctx, max_new_tokens=max_new, do_sample=do_sample or best_of > 1,
                          temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, typical_p=p.typical_p,
                          repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
                          presence_penalty=p.presence_penalty, stop=stop, seed=p.seed,
                          min_new_tokens=p.min_new_tokens, ignore_eos=p.ignore_eos,
                          top_n_tokens=p.top_n_tokens, logprobs=True,
                          prompt_logprobs=bool(p.decoder_input_details), adapter=adapter)
    grammar = grammar_for(ctx, p.grammar, "grammar")
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    return params, p, ids, best_of


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


def _details(g: Generation, p: GenerateParameters) -> Details:
    prompt = g.events[0].prompt_logprobs or []
    details = Details(finish_reason=g.finish.value, generated_tokens=len(g.events), seed=g.seed,
                      prefill=[PrefillToken(id=t.token_id, text=t.text, logprob=t.logprob) for t in prompt],
                      tokens=[_token(e) for e in g.events])
    if p.top_n_tokens:
        details.top_tokens = [_top(e) for e in g.events]
    return details


def generate(ctx: ServingContext, body, *, full_text_default: bool) -> JsonResponse:
    """Non-streaming native generation; the caller wraps the object in a list for POST / and /invocations."""
    t0 = time.monotonic()
    req = parse(GenerateRequest, body)
    params, p, ids, best_of = prepare(ctx, req, "parameters" in body and body["parameters"] is not None, False)
    streams = submit_n(ctx, ids, params, best_of)
    t_valid = time.monotonic()
    try:
        gens = [Generation(s.seed, *collect(s)) for s in streams]
    finally:
        for s in streams:
            s.abort()  # no-op when finished; frees the others when one failed or the client left
    best = max(gens, key=lambda g: g.mean_logprob)
    full = p.return_full_text if p.return_full_text is not None else full_text_default

    def text_of(g: Generation) -> str:
        text = ctx.engine.decode([e.token_id for e in g.events])
        return (req.inputs + text) if full else text

    out = GenerateResponse(generated_text=text_of(best))
    if p.details or p.decoder_input_details:
        out.details = _details(best, p)
        if best_of > 1:
            out.details.best_of_sequences = [
                BestOfSequence(generated_text=text_of(g), **_details(g, p).model_dump(exclude={"best_of_sequences"}))
                for g in gens if g is not best]
    return JsonResponse(out, headers=timing_headers(ctx, t0, t_valid, len(ids), len(best.events), req.inputs))


def timing_headers(ctx, t0: float, t_valid: float, n_in: int, n_out: int, text: str) -> dict:
    now = time.monotonic()
    total_ms, infer_ms = int((now - t0) * 1000), int((now - t_valid) * 1000)
    device = "gpu+optimized" if ctx.engine.model.device == "cuda" else "cpu"
    return {
        "x-compute-type": ctx.settings.compute_type or device,
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
    stream = ctx.submit(ids, params)
    full = p.return_full_text if p.return_full_text is not None else full_text_default
    generated: list[int] = []

    def render(ev: TokenEvent) -> list[bytes]:
        if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
            return [error_event(generation_failed(ev.error), "tgi")]
        generated.append(ev.token_id)
        out = StreamChunk(index=ev.index, token=_token(ev))
        if p.top_n_tokens:
            out.top_tokens = _top(ev)
        if ev.finish_reason is not None:
            text = ctx.engine.decode(generated)
            out.generated_text = (req.inputs + text) if full else text
            if p.details:
                out.details = StreamDetails(finish_reason=ev.finish_reason.value, generated_tokens=len(generated),
                                            seed=stream.seed, input_length=len(ids))
        return [sse(out)]

    headers = {**SSE_HEADERS, "x-compute-type": ctx.settings.compute_type or ctx.engine.model.device,
               "x-compute-characters": str(len(req.inputs))}

    def chunks():
        try:
            yield from event_stream(stream, render)
        except Exception as exc:  # the engine died or the server is stopping: say so in the stream
            yield error_event(stream_failure(exc), "tgi")

    return StreamResponse(chunks(), headers)


def tokenize(ctx: ServingContext, body) -> JsonResponse:
    req = parse(GenerateRequest, body)
    if not req.inputs:
        raise invalid("`inputs` cannot be empty", "inputs")
    raw = req.inputs
    truncate = req.parameters.truncate if req.parameters else None
    limit = ctx.engine.limits.max_input_tokens
    spans = tokenize_bounded(ctx, raw, "inputs", limit, ctx.engine.tokenize_with_offsets, truncate)
    if truncate is None and len(spans) > limit:  # bounded like a prompt: ~10 bytes of JSON per character
        raise invalid(f"`inputs` must have less than {limit + 1} tokens. Given: {len(spans)} "
                      f"(MAX_INPUT_TOKENS={limit})", "inputs")
    to_byte = _byte_offsets(raw)
    return JsonResponse([TokenizedToken(id=tid, text=raw[start:end], start=to_byte(start), stop=to_byte(end))
                         for tid, start, end in spans])


def _byte_offsets(text: str):
    """Character offset -> UTF-8 byte offset, in one pass for offsets that rise (a token's)."""
    if text.isascii():
        return lambda i: i
    at = [0, 0]  # the last (character, byte) offset

    def to_byte(i: int) -> int:
        if i < at[0]:
            at[0] = at[1] = 0
        at[1] += len(text[at[0]:i].encode())
        at[0] = i
        return at[1]
    return to_byte
