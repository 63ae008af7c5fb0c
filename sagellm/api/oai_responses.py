"""OpenAI's Responses API: POST /v1/responses on the chat path (the request becomes a chat body
(responses_input.py) that chat.prepare_chat renders, constrains and checks; chat_parts.choice_parts
reads the engine's events), turned into output items and the typed stream events; GET and DELETE
/v1/responses/{id} over the store (response_store.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from pydantic import MISSING, BaseModel

from sagellm.api.chat import prepare_chat
from sagellm.api.chat_parts import CallsPart, EndPart, ErrorPart, TextPart, choice_parts, drive
from sagellm.api.context import ServingContext
from sagellm.api.parse import parse
from sagellm.api.protocol_responses import (ArgumentsDeltaEvent, ArgumentsDoneEvent, ContentPartEvent,
                                            DeletedResponse, FunctionCallItem, IncompleteDetails, OutputItemEvent,
                                            OutputMessage, OutputText, ResponseErrorInfo, ResponseLifecycleEvent,
                                            ResponseObject, ResponsesRequest, ResponseUsage, StreamErrorEvent,
                                            TextDeltaEvent, TextDoneEvent)
from sagellm.api.responses import JsonResponse, StreamResponse
from sagellm.api.responses_input import chat_body, conversation, refuse_unsupported, renamed
from sagellm.api.submit import submit_n
from sagellm.errors import BadRequest, NotFound, SagellmError


class Builder:
    """Grows the response from the choice's parts, yielding the events that describe each change
    (None for a keep-alive). The events hold live objects: serialise each before the next."""

    def __init__(self, resp: ResponseObject, n_prompt: int, logprobs: bool):
        self.resp, self.n_prompt, self.logprobs = resp, n_prompt, logprobs
        self.seq = 0
        self.current: OutputMessage | FunctionCallItem | None = None
        self.calls: dict[int, FunctionCallItem] = {}  # tool call index -> its item
        self.failure: SagellmError | None = None  # how it failed, as the client hears it

    def _ev(self, cls, **fields):
        event = cls(sequence_number=self.seq, **fields)
        self.seq += 1
        return event

    def _life(self, kind: str) -> ResponseLifecycleEvent:
        return self._ev(ResponseLifecycleEvent, type=kind, response=self.resp)

    def _open(self, item) -> Iterator[BaseModel]:
        self.resp.output.append(item)
        self.current = item
        yield self._ev(OutputItemEvent, type="response.output_item.added", output_index=self._index(), item=item)
        if isinstance(item, OutputMessage):
            part = OutputText(text="", logprobs=[] if self.logprobs else MISSING)
            item.content.append(part)
            yield self._ev(ContentPartEvent, type="response.content_part.added", item_id=item.id,
                           output_index=self._index(), content_index=0, part=part)

    def _index(self) -> int:
        return len(self.resp.output) - 1

    def _close(self, status: str = "completed") -> Iterator[BaseModel]:
        item, self.current = self.current, None
        if item is None:
            return
        index = self.resp.output.index(item)
        if isinstance(item, OutputMessage):
            part = item.content[0]
            yield self._ev(TextDoneEvent, item_id=item.id, output_index=index, content_index=0, text=part.text,
                           logprobs=part.logprobs if self.logprobs else [])
            yield self._ev(ContentPartEvent, type="response.content_part.done", item_id=item.id,
                           output_index=index, content_index=0, part=part)
        else:
            yield self._ev(ArgumentsDoneEvent, item_id=item.id, output_index=index, name=item.name,
                           arguments=item.arguments)
        item.status = status
        yield self._ev(OutputItemEvent, type="response.output_item.done", output_index=index, item=item)

    def run(self, parts) -> Iterator[BaseModel | None]:
        yield self._life("response.created")
        yield self._life("response.in_progress")
        for part in parts:
            if part is None:
                yield None
            elif isinstance(part, TextPart):
                if not isinstance(self.current, OutputMessage):
                    # Text after a call only when the token limit cut the call short.
                    yield from self._close("incomplete")
                    yield from self._open(OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress",
                                                        content=[]))
                out = self.current.content[0]
                out.text += part.text
                if self.logprobs:
                    out.logprobs.extend(part.logprobs or [])
                yield self._ev(TextDeltaEvent, item_id=self.current.id, output_index=self._index(),
                               content_index=0, delta=part.text, logprobs=part.logprobs or [])
            elif isinstance(part, CallsPart):
                for d in part.deltas:
                    if d.id is not MISSING:
                        yield from self._close()
                        item = FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=d.id, name=d.function.name,
                                                arguments="", status="in_progress")
                        self.calls[d.index] = item
                        yield from self._open(item)
                    item = self.calls[d.index]
                    if d.function.arguments:
                        item.arguments += d.function.arguments
                        yield self._ev(ArgumentsDeltaEvent, item_id=item.id,
                                       output_index=self.resp.output.index(item), delta=d.function.arguments)
            elif isinstance(part, EndPart):
                cut = part.finish_reason == "length"
                yield from self._close("incomplete" if cut else "completed")
                self.resp.status = "incomplete" if cut else "completed"
                if cut:
                    self.resp.incomplete_details = IncompleteDetails(reason="max_output_tokens")
                self.resp.usage = ResponseUsage(input_tokens=self.n_prompt, output_tokens=part.completion_tokens,
                                                total_tokens=self.n_prompt + part.completion_tokens)
                yield self._life(f"response.{self.resp.status}")
                return
            else:
                self.failure = part.error
                message = part.error.message
                self.resp.status = "failed"
                self.resp.error = ResponseErrorInfo(code="server_error", message=message)
                yield self._ev(StreamErrorEvent, code="server_error", message=message)
                yield self._life("response.failed")
                return


def create(ctx: ServingContext, body) -> JsonResponse | StreamResponse:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    refuse_unsupported(body)
    req = parse(ResponsesRequest, body)
    messages = conversation(ctx, req)
    try:
        job = prepare_chat(ctx, chat_body(req, messages))
    except SagellmError as exc:
        raise renamed(exc) from None
    fmt = req.text.format if req.text is not None and req.text.format is not None else {"type": "text"}
    resp = ResponseObject(
        id=f"resp_{uuid.uuid4().hex}", created_at=int(time.time()), status="in_progress",
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, model=ctx.engine.model.served_name,
        parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
        store=req.store is not False and ctx.store.max_items > 0, temperature=req.temperature, top_p=req.top_p,
        top_logprobs=req.top_logprobs, tool_choice=req.tool_choice or "auto", tools=req.tools or [],
        text={"format": fmt}, metadata=req.metadata or {}, user=req.user)
    (stream,) = submit_n(ctx, job.ids, job.params, 1)
    builder = Builder(resp, len(job.ids), logprobs=bool(job.req.logprobs))
    parts = choice_parts(job, 0, stream, ctx.submit)

    def finish() -> None:
        parts.close()
        stream.abort()  # a no-op once it finished; a client gone mid-stream stops it now
        if resp.store and resp.status in ("completed", "incomplete"):
            ctx.store.put(resp, messages)

    streamed = drive(builder.run, parts, bool(req.stream), finish)
    if streamed is not None:
        return streamed
    if resp.status == "failed":
        raise builder.failure
    return JsonResponse(resp)


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"response {response_id!r} not found (unknown, created with store=false, deleted, older than "
                    "RESPONSES_STORE_TTL_S or dropped by RESPONSES_STORE_SIZE)", param="response_id")


def retrieve(ctx: ServingContext, response_id: str) -> JsonResponse:
    stored = ctx.store.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return JsonResponse(stored.response)


def delete(ctx: ServingContext, response_id: str) -> JsonResponse:
    if not ctx.store.delete(response_id):
        raise _not_found(response_id)
    return JsonResponse(DeletedResponse(id=response_id))
