"""One chat choice as a sequence of typed parts, from its engine events: text (with logprobs),
tool-call deltas, the end, or an error. A declined tool call (`no_tool`) is answered in plain
text by a second request (sagellm/api/tools.py)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sagellm.api.choices import finish_reason, interleave
from sagellm.api.error_shapes import generation_failed, stream_failure
from sagellm.api.protocol import ChatCompletionRequest
from sagellm.api.protocol_openai import LogprobEntry, ToolCallDelta, TopLogprob
from sagellm.api.responses import SSE_HEADERS, SSE_KEEPALIVE, StreamResponse, named_sse
from sagellm.api.submit import nth_params
from sagellm.api.tools import CallStreamer, ToolPlan, parse_calls
from sagellm.engine.client import RequestStream
from sagellm.engine.events import FinishReason, TokenEvent
from sagellm.engine.sampling_params import SamplingParams
from sagellm.errors import SagellmError


@dataclass
class ChatJob:
    """A validated chat request: what to submit per choice, and how to answer in text instead
    when tool_choice "auto" lets the model decline every tool."""

    req: ChatCompletionRequest
    ids: list[int]
    params: SamplingParams
    tools: ToolPlan | None
    # Renders the tool-free prompt for a declined call, only when the model declines: it is no
    # longer than the tool prompt, which passed the same length checks.
    plain: Callable[[], tuple[list[int], SamplingParams]] | None
    prompt: str  # the rendered conversation, as the model sees it


@dataclass
class TextPart:
    text: str
    logprobs: list[LogprobEntry] | None  # when the request asked for logprobs


@dataclass
class CallsPart:
    deltas: list[ToolCallDelta]


@dataclass
class EndPart:
    finish_reason: str  # "stop", "length" or "tool_calls"
    stop_reason: str | int | None
    completion_tokens: int


@dataclass
class ErrorPart:
    error: SagellmError  # how the choice failed, as the client will hear it


Part = TextPart | CallsPart | EndPart | ErrorPart


def failed_part(exc: Exception) -> ErrorPart:
    """A stream that raised after its first byte: logged with its traceback; the client reads only
    the kind of failure (an exception's text may hold internals)."""
    logging.getLogger("sagellm").error("generation failed mid-stream", exc_info=exc)
    return ErrorPart(stream_failure(exc))


def drive(run: Callable[[Iterator[Part]], Iterator], parts: Iterator[Part], stream: bool,
          finish: Callable[[], None]) -> StreamResponse | None:
    """A Responses or Anthropic builder's `run` over one choice's parts: streamed as named
    server-sent events (returned; a keep-alive while the engine is quiet), or read to the end here
    (None). `finish` runs once either way, when the parts are done with."""
    if stream:
        def events():
            try:
                for event in run(part for _, part in interleave([parts], failed_part)):
                    yield SSE_KEEPALIVE if event is None else named_sse(event)
            finally:
                finish()
        return StreamResponse(events(), dict(SSE_HEADERS))
    try:
        for _ in run(parts):
            pass
    finally:
        finish()
    return None


def _logprob_entry(ev: TokenEvent) -> LogprobEntry:
    return LogprobEntry(token=ev.text, logprob=ev.logprob, bytes=list(ev.text.encode()),
                        top_logprobs=[TopLogprob(token=t.text, logprob=t.logprob, bytes=list(t.text.encode()))
                                      for t in ev.top_tokens])


def choice_parts(job: ChatJob, index: int, stream: RequestStream,
                 submit: Callable[[list[int], SamplingParams], RequestStream]) -> Iterator[Part | None]:
    """Choice `index`'s parts; None while idle (a keep-alive). Closing it aborts the request."""
    streamer = CallStreamer() if job.tools is not None else None
    n_out = 0
    done = False
    try:
        for ev in stream.iter_events(15.0):
            if ev is None:
                yield None
                continue
            if ev.finish_reason in (FinishReason.ERROR, FinishReason.ABORTED):
                done = True
                yield ErrorPart(generation_failed(ev.error))
                return
            n_out += 1
            if streamer is None:
                lp = None
                if job.req.logprobs and not (ev.special and ev.finish_reason == FinishReason.EOS_TOKEN):
                    lp = [_logprob_entry(ev)]
                if ev.delta or lp:
                    yield TextPart(ev.delta, lp)
            else:
                deltas, first = streamer.feed(ev.delta)
                if first == job.tools.no_tool and job.plain is not None:
                    stream.abort()
                    done = True
                    plain_ids, plain_params = job.plain()
                    plain_job = dataclasses.replace(job, ids=plain_ids, params=plain_params, tools=None, plain=None)
                    yield from choice_parts(plain_job, index, submit(plain_ids, nth_params(plain_params, index)),
                                            submit)
                    return
                if deltas:
                    yield CallsPart([ToolCallDelta.model_validate(d) for d in deltas])
            if ev.finish_reason is not None:
                done = True
                reason = finish_reason(ev.finish_reason)
                if streamer is not None:
                    if parse_calls(streamer.text) is not None:
                        reason = "tool_calls"
                    elif ev.finish_reason != FinishReason.LENGTH:
                        yield ErrorPart(generation_failed("the model's tool call did not complete"))
                        return
                    else:
                        yield TextPart(streamer.text, None)  # cut by the token limit: shown as text
                yield EndPart(reason, ev.stop_reason, n_out)
                return
    finally:
        if not done:
            stream.abort()
