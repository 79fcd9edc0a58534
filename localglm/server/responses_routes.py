"""OpenAI Responses API routes: POST /v1/responses (streaming and not), POST /v1/responses/input_tokens,
GET and DELETE /v1/responses/{id}.

Why: Codex CLI talks to a model provider only through this API since its `wire_api = "chat"` was
removed (February 2026), and OpenAI's SDKs steer agents to it. The engine's events become output
items in generation order: a `reasoning` item (GLM's thinking, as `reasoning_text` content, as vLLM
and Ollama return gpt-oss's), a `message` with one `output_text` part, and a `function_call` (or
`custom_tool_call`) item per tool call. Streams follow OpenAI's event sequence, every event named
and numbered (`sequence_number`): response.created, response.in_progress, then per item
output_item.added, its content_part.added and deltas (reasoning_text, output_text,
function_call_arguments), their .done events and output_item.done, and last response.completed
(response.incomplete when max_output_tokens or the context ended it). Responses are stored in
memory unless `store: false` (response_store.py), so `previous_response_id` continues them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field as dataclass_field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat.stream_parser import ContentDelta, ThinkingDelta, ToolCall, ToolCallArgsDelta, ToolCallEnd, ToolCallStart
from ..engine import Done
from .chat import Reply, admit, custom_input, json_reply, model_name, prepare, request_body, start_job, stream_job
from .errors import APIError, bad_request
from .response_store import StoredResponse
from .responses_request import ResponsesRequest, parse_request
from .sse import EventStreamResponse, sse_event
from .state import ServerState
from .validation import field
from .worker import Job


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class _Head:
    ident: str
    created: int
    model: str


# ---- output items ----------------------------------------------------------------------------------
def reasoning_item(ident: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text or status != "in_progress" else []
    return {"type": "reasoning", "id": ident, "summary": [], "content": content, "status": status}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(ident: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [output_text(text)]
    return {"type": "message", "id": ident, "status": status, "role": "assistant", "content": content}


def call_item(ident: str, call_id: str, name: str, arguments: str, custom: bool, status: str = "completed") -> dict[str, Any]:
    if custom:
        return {"type": "custom_tool_call", "id": ident, "call_id": call_id, "name": name, "input": arguments}
    return {"type": "function_call", "id": ident, "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def _call_text(call: ToolCall, custom: bool) -> str:
    return custom_input(call.arguments) if custom else call.arguments_json


def _items(reply: Reply, parsed: ResponsesRequest, incomplete: bool) -> list[dict[str, Any]]:
    """A whole (non-streamed) reply's output items, in generation order."""
    items: list[dict[str, Any]] = []
    if reply.thinking_text:
        items.append(reasoning_item(_new_id("rs"), reply.thinking_text))
    if reply.content_text or not reply.calls:
        items.append(message_item(_new_id("msg"), reply.content_text, "incomplete" if incomplete else "completed"))
    for call in reply.calls:
        custom = call.name in parsed.gen.custom_tools
        status = "incomplete" if call.truncated else "completed"
        items.append(call_item(_new_id("ctc" if custom else "fc"), call.id, call.name, _call_text(call, custom), custom, status))
    return items


# ---- the response object ---------------------------------------------------------------------------
def _usage(state: ServerState, reply: Reply) -> dict[str, Any]:
    prompt, cached, completion = reply.usage_numbers()
    tokenizer = state.model.tokenizer
    thinking = reply.thinking_text
    reasoning = len(tokenizer.encode(thinking)) if thinking and tokenizer is not None else 0  # re-tokenized: close, not exact
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": min(reasoning, completion)},
        "total_tokens": prompt + completion,
    }


def _response(head: _Head, parsed: ResponsesRequest, status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    body = {
        "id": head.ident, "object": "response", "created_at": head.created, "status": status, "error": None,
        "incomplete_details": None, "model": head.model, "output": output, "usage": None, "store": parsed.store,
        **parsed.echo,
    }  # fmt: skip
    body.update(extra)
    return body


def _final(state: ServerState, reply: Reply, head: _Head, parsed: ResponsesRequest, output: list[dict[str, Any]]) -> dict[str, Any]:
    """The finished response object; stored for previous_response_id unless the request said store: false."""
    fin = reply.finish()
    incomplete = fin.reason == "length"
    body = _response(
        head, parsed, "incomplete" if incomplete else "completed", output,
        incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
        usage=_usage(state, reply), completed_at=int(time.time()),
    )  # fmt: skip
    if parsed.store:
        turn: dict[str, Any] = {"role": "assistant", "content": reply.content_text}
        if reply.thinking_text:
            turn["reasoning_content"] = reply.thinking_text
        if reply.calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in reply.calls]
        state.responses.put(head.ident, StoredResponse(history=[*parsed.history, turn], body=body))
    return body


# ---- routes ----------------------------------------------------------------------------------------
def _prior(state: ServerState, body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The stored conversation `previous_response_id` continues (None without one)."""
    ident = field(body, "previous_response_id", "string")
    if ident is None:
        return None
    stored = state.responses.get(ident)
    if stored is None:
        raise bad_request(
            f"previous_response_id: no stored response {ident!r} (this server keeps the last {state.responses.capacity} "
            "responses made with store: true, in memory, until it stops)", "previous_response_id",
        )  # fmt: skip
    return stored.history


async def create(request: Request) -> Response:
    state, body = await request_body(request)
    parsed = parse_request(body, _prior(state, body))
    job, reply = await start_job(state, parsed.gen)
    head = _Head(_new_id("resp"), int(time.time()), model_name(state, body))
    if parsed.stream:
        return EventStreamResponse(_Stream(state, reply, head, parsed).run(job))
    return await json_reply(request, state, job, reply, lambda: _final(state, reply, head, parsed, _items(reply, parsed, reply.finish().reason == "length")))


async def input_tokens(request: Request) -> Response:
    """The prompt's token count, tokenized as a generation would be (a prompt longer than the context is still counted)."""
    state, body = await request_body(request)
    parsed = parse_request(body, _prior(state, body), for_count=True)
    with admit(state):
        await prepare(state, parsed.gen, fit=False)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": parsed.gen.prompt_tokens})


def _stored(state: ServerState, ident: str) -> StoredResponse:
    stored = state.responses.get(ident)
    if stored is None:
        raise APIError(404, f"no stored response {ident!r} (responses made with store: true are kept in memory, the last "
                       f"{state.responses.capacity}, until the server stops)", param="response_id", code="not_found")  # fmt: skip
    return stored


async def retrieve(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse(_stored(state, request.path_params["response_id"]).body)


async def delete(request: Request) -> Response:
    state: ServerState = request.app.state.server
    ident = request.path_params["response_id"]
    _stored(state, ident)
    state.responses.delete(ident)
    return JSONResponse({"id": ident, "object": "response", "deleted": True})


# ---- streaming -------------------------------------------------------------------------------------
@dataclass
class _Open:
    """The output item being streamed."""

    kind: str  # "reasoning" | "message" | "call"
    ident: str
    index: int  # its output_index
    text: list[str] = dataclass_field(default_factory=list)
    call_index: int = -1
    call_id: str = ""
    name: str = ""
    custom: bool = False


class _Stream:
    """One streamed response: the engine's events -> named, numbered Responses API events."""

    def __init__(self, state: ServerState, reply: Reply, head: _Head, parsed: ResponsesRequest) -> None:
        self.state, self.reply, self.head, self.parsed = state, reply, head, parsed
        self.seq = 0
        self.done_items: list[dict[str, Any]] = []
        self.open: _Open | None = None

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse_event(kind, data)

    def run(self, job: Job) -> AsyncIterator[str]:
        start = _response(self.head, self.parsed, "in_progress", [])
        return stream_job(
            self.state, job, self.reply, self.render,
            ping=": keep-alive\n\n",
            error=self.failed,
            first=[self.event("response.created", response=start), self.event("response.in_progress", response=start)],
        )  # fmt: skip

    def failed(self, err: APIError) -> str:
        """The job failed mid-stream: an `error` event, then `response.failed` (what Codex waits for) with the items so far."""
        error = {"code": err.code or "server_error", "message": err.message}
        body = _response(self.head, self.parsed, "failed", self.done_items, error=error)
        return self.event("error", code=err.code, message=err.message, param=err.param) + self.event("response.failed", response=body)

    def _begin(self, kind: str, prefix: str, **call: Any) -> Iterator[str]:
        yield from self._close()
        self.open = opened = _Open(kind, _new_id(prefix), len(self.done_items), **call)
        where = {"item_id": opened.ident, "output_index": opened.index}
        if kind == "reasoning":
            yield self.event("response.output_item.added", output_index=opened.index, item=reasoning_item(opened.ident, "", "in_progress"))
            yield self.event("response.content_part.added", **where, content_index=0, part={"type": "reasoning_text", "text": ""})
        elif kind == "message":
            yield self.event("response.output_item.added", output_index=opened.index, item=message_item(opened.ident, None, "in_progress"))
            yield self.event("response.content_part.added", **where, content_index=0, part=output_text(""))
        else:
            item = call_item(opened.ident, opened.call_id, opened.name, "", opened.custom, "in_progress")
            yield self.event("response.output_item.added", output_index=opened.index, item=item)

    def _close(self, end: ToolCallEnd | None = None) -> Iterator[str]:
        opened, self.open = self.open, None
        if opened is None:
            return
        text = "".join(opened.text)
        where = {"item_id": opened.ident, "output_index": opened.index}
        if opened.kind == "reasoning":
            yield self.event("response.reasoning_text.done", **where, content_index=0, text=text)
            yield self.event("response.content_part.done", **where, content_index=0, part={"type": "reasoning_text", "text": text})
            item = reasoning_item(opened.ident, text)
        elif opened.kind == "message":
            yield self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            yield self.event("response.content_part.done", **where, content_index=0, part=output_text(text))
            item = message_item(opened.ident, text, "incomplete" if self._length() else "completed")
        else:
            truncated = end is None or end.call.truncated
            if opened.custom:
                text = custom_input(end.call.arguments) if end is not None else ""
                yield self.event("response.custom_tool_call_input.delta", **where, delta=text)
                yield self.event("response.custom_tool_call_input.done", **where, input=text)
            else:
                yield self.event("response.function_call_arguments.done", **where, arguments=text, name=opened.name)
            item = call_item(opened.ident, opened.call_id, opened.name, text, opened.custom, "incomplete" if truncated else "completed")
        self.done_items.append(item)
        yield self.event("response.output_item.done", output_index=opened.index, item=item)

    def _length(self) -> bool:
        return self.reply.done is not None and self.reply.finish().reason == "length"

    def render(self, item: Any) -> Iterator[str]:
        opened = self.open
        if isinstance(item, ThinkingDelta):
            if opened is None or opened.kind != "reasoning":
                yield from self._begin("reasoning", "rs")
            assert self.open is not None
            self.open.text.append(item.text)
            yield self.event("response.reasoning_text.delta", item_id=self.open.ident, output_index=self.open.index, content_index=0, delta=item.text)
        elif isinstance(item, ContentDelta):
            if opened is None or opened.kind != "message":
                yield from self._begin("message", "msg")
            assert self.open is not None
            self.open.text.append(item.text)
            yield self.event("response.output_text.delta", item_id=self.open.ident, output_index=self.open.index, content_index=0,
                             delta=item.text, logprobs=[])  # fmt: skip
        elif isinstance(item, ToolCallStart):
            custom = item.name in self.parsed.gen.custom_tools
            yield from self._begin("call", "ctc" if custom else "fc", call_index=item.index, call_id=item.id, name=item.name, custom=custom)
        elif isinstance(item, ToolCallArgsDelta):
            if opened is not None and opened.kind == "call" and opened.call_index == item.index:
                opened.text.append(item.text)
                if not opened.custom:  # a custom tool's input is JSON-escaped here: sent whole at the end
                    yield self.event("response.function_call_arguments.delta", item_id=opened.ident, output_index=opened.index, delta=item.text)
        elif isinstance(item, ToolCallEnd):
            if opened is not None and opened.kind == "call" and opened.call_index == item.index:
                yield from self._close(item)
        elif isinstance(item, Done):
            yield from self._close()
            if not self.done_items:  # nothing at all came out: an empty message, as a whole reply has
                yield from self._begin("message", "msg")
                yield from self._close()
            body = _final(self.state, self.reply, self.head, self.parsed, self.done_items)
            yield self.event("response.incomplete" if body["status"] == "incomplete" else "response.completed", response=body)
