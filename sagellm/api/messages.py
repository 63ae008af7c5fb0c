"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens on the chat path
(the request becomes a chat body (anthropic_input.py) that chat.prepare_chat renders, constrains
and checks; chat_parts.choice_parts reads the engine's events), turned into content blocks,
stop_reason and Anthropic's stream events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

from pydantic import MISSING, BaseModel

from sagellm.api.anthropic_input import chat_body, refuse_unsupported, renamed
from sagellm.api.chat import prepare_chat
from sagellm.api.chat_parts import CallsPart, EndPart, ErrorPart, TextPart, choice_parts, drive
from sagellm.api.context import ServingContext
from sagellm.api.error_shapes import error_body
from sagellm.api.parse import parse
from sagellm.api.protocol_anthropic import (AnthropicMessage, AnthropicUsage, ContentBlockDeltaEvent,
                                            ContentBlockStartEvent, ContentBlockStopEvent, CountTokensRequest,
                                            InputJsonDelta, MessageDeltaBody, MessageDeltaEvent, MessagesRequest,
                                            MessageStartEvent, MessageStopEvent, TextBlock, TextDelta, TokenCount,
                                            ToolUseBlock, ToolUseStart)
from sagellm.api.responses import JsonResponse, StreamResponse
from sagellm.api.submit import submit_n
from sagellm.errors import BadRequest, SagellmError


def _stop(part: EndPart) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for how the choice ended."""
    if part.finish_reason == "tool_calls":
        return "tool_use", None
    if part.finish_reason == "length":
        return "max_tokens", None
    if isinstance(part.stop_reason, str):  # a stop string matched (a token id is the end of the turn)
        return "stop_sequence", part.stop_reason
    return "end_turn", None


class Builder:
    """Grows the message from the choice's parts, yielding Anthropic's events (None for a
    keep-alive). The events hold live objects: serialise each before the next."""

    def __init__(self, msg: AnthropicMessage):
        self.msg = msg
        self.open: TextBlock | ToolUseBlock | None = None
        self.args: dict[int, str] = {}  # content index of a tool_use block -> its arguments' JSON text so far
        self.calls: dict[int, int] = {}  # tool call index -> content index
        self.unfinished: list[ToolUseBlock] = []  # calls the token limit cut short
        self.failure: SagellmError | None = None

    def _close(self) -> Iterator[BaseModel]:
        block, self.open = self.open, None
        if block is None:
            return
        index = self.msg.content.index(block)
        if isinstance(block, ToolUseBlock):
            try:
                block.input = json.loads(self.args[index])
            except ValueError:
                self.unfinished.append(block)
        yield ContentBlockStopEvent(index=index)

    def _start(self, block) -> Iterator[BaseModel]:
        yield from self._close()
        self.msg.content.append(block)
        self.open = block
        shown = TextBlock(text="") if isinstance(block, TextBlock) else ToolUseStart(id=block.id, name=block.name)
        yield ContentBlockStartEvent(index=len(self.msg.content) - 1, content_block=shown)

    def run(self, parts) -> Iterator[BaseModel | None]:
        yield MessageStartEvent(message=self.msg)
        for part in parts:
            if part is None:
                yield None
            elif isinstance(part, TextPart):
                if not part.text:
                    continue
                if not isinstance(self.open, TextBlock):
                    yield from self._start(TextBlock(text=""))
                self.open.text += part.text
                yield ContentBlockDeltaEvent(index=len(self.msg.content) - 1, delta=TextDelta(text=part.text))
            elif isinstance(part, CallsPart):
                for d in part.deltas:
                    if d.id is not MISSING:
                        # Our call ids are call_<hex>; Anthropic's clients expect toolu_<...>.
                        block = ToolUseBlock(id="toolu_" + d.id.removeprefix("call_"), name=d.function.name,
                                             input={})
                        yield from self._start(block)
                        self.calls[d.index] = len(self.msg.content) - 1
                        self.args[self.calls[d.index]] = ""
                    index = self.calls[d.index]
                    if d.function.arguments:
                        self.args[index] += d.function.arguments
                        yield ContentBlockDeltaEvent(index=index, delta=InputJsonDelta(partial_json=d.function.arguments))
            elif isinstance(part, EndPart):
                yield from self._close()
                reason, sequence = _stop(part)
                self.msg.stop_reason, self.msg.stop_sequence = reason, sequence
                self.msg.usage.output_tokens = part.completion_tokens
                yield MessageDeltaEvent(delta=MessageDeltaBody(stop_reason=reason, stop_sequence=sequence),
                                        usage={"output_tokens": part.completion_tokens})
                yield MessageStopEvent()
                return
            else:
                self.failure = part.error
                yield error_body(part.error, "anthropic")
                return


def _prepare(ctx: ServingContext, req, max_tokens: int | None):
    try:
        return prepare_chat(ctx, chat_body(req, max_tokens))
    except SagellmError as exc:
        raise renamed(exc) from None


def create(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    refuse_unsupported(body)
    req = parse(MessagesRequest, body)
    job = _prepare(ctx, req, req.max_tokens)
    (stream,) = submit_n(ctx, job.ids, job.params, 1)
    msg = AnthropicMessage(id=f"msg_{uuid.uuid4().hex}", model=ctx.engine.model.served_name, content=[],
                           stop_reason=None, stop_sequence=None,
                           usage=AnthropicUsage(input_tokens=len(job.ids), output_tokens=0))
    builder = Builder(msg)
    parts = choice_parts(job, 0, stream, ctx.submit)

    def finish() -> None:
        parts.close()
        stream.abort()  # a no-op once it finished; a client gone mid-stream stops it now

    streamed = drive(builder.run, parts, bool(req.stream), finish)
    if streamed is not None:
        return streamed
    if builder.failure is not None:
        raise builder.failure
    # A call cut short by max_tokens has no input to give; the text block after it holds what was written.
    msg.content = [b for b in msg.content if not any(b is u for u in builder.unfinished)]
    return JsonResponse(msg)


def count_tokens(ctx: ServingContext, body) -> JsonResponse:
    """The prompt's tokens as create would submit them (tools' instruction included)."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    refuse_unsupported(body)
    job = _prepare(ctx, parse(CountTokensRequest, body), None)
    return JsonResponse(TokenCount(input_tokens=len(job.ids)))
