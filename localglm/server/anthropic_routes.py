"""Anthropic-compatible routes: POST /v1/messages (streaming and not) and /v1/messages/count_tokens.

Claude-Code-style agents send `system`, content blocks (`text`, `tool_use`, `tool_result`,
`thinking`) and `tools` with `input_schema`; we translate them to the GLM chat messages the
checkpoint's template renders, and the engine's events back into `thinking`, `text` and `tool_use`
blocks. Streams follow Anthropic's event sequence: message_start, then per block
content_block_start / content_block_delta (thinking_delta, text_delta, input_json_delta) /
content_block_stop, then message_delta (stop_reason end_turn, tool_use, max_tokens or
stop_sequence, model_context_window_exceeded when the context, not max_tokens, ended it, and the
final usage) and message_stop. No empty block is ever sent: an empty
`<think></think>` produces no thinking block. Thinking follows `thinking: {type: ...}` when the
request has it, else the server's default (--no-think); `thinking.budget_tokens` bounds the thinking
block (`</think>` is forced at the budget). tool_choice any / tool / none is enforced while decoding,
and `output_format: {type: "json_schema", schema}` (Anthropic's structured outputs) holds the text
to JSON (localglm/grammar).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import Done
from ..chat.stream_parser import ContentDelta, ThinkingDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart
from .chat import (
    IMAGE_PLACEHOLDER,
    Finish,
    GenRequest,
    Reply,
    admit,
    checked_format,
    content_parts,
    content_text,
    json_reply,
    model_name,
    prepare,
    request_body,
    start_job,
    stream_job,
)
from .errors import bad_request
from .sse import EventStreamResponse, sse_event
from .state import ServerState
from .validation import expect, field, join, tool_schema
from .worker import Job

STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens", "stop_sequence": "stop_sequence"}


def stop_reason(fin: Finish) -> str:
    """Anthropic's stop_reason; `model_context_window_exceeded` when the context ended the reply."""
    return "model_context_window_exceeded" if fin.context else STOP_REASONS[fin.reason]


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


# ---- request parsing -----------------------------------------------------------------------------
def _text_blocks(value: Any, path: str, *, images_ok: bool = False) -> str:
    """A string, or an array of text blocks (tool results may also hold images: replaced by a note)."""

    def other(where: str, kind: str, block: Any) -> str:
        if kind in ("image", "document") and images_ok:
            return IMAGE_PLACEHOLDER
        raise bad_request(f"{where}.type: {kind!r} blocks are not supported here (text only)", f"{where}.type")

    return content_text(value, path, "content blocks", other)


def _user_turn(content: Any, path: str) -> list[dict[str, Any]]:
    """One Anthropic user turn -> GLM messages: tool results become `tool` messages, text a user message."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []

    def flush_text() -> None:
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
            texts.clear()

    for where, kind, block in content_parts(content, path, "content blocks"):
        if kind == "text":
            texts.append(field(block, "text", "string", path=where, required=True))
        elif kind == "tool_result":
            flush_text()
            tool_use_id = field(block, "tool_use_id", "string", path=where, required=True)
            result = _text_blocks(block.get("content"), join(where, "content"), images_ok=True)
            if field(block, "is_error", "boolean", path=where, default=False):
                result = f"Error: {result}"
            out.append({"role": "tool", "content": result, "tool_call_id": tool_use_id})
        elif kind in ("image", "document"):
            raise bad_request(f"{where}.type: {kind!r} blocks are not supported: this model reads text only", f"{where}.type")
        else:
            raise bad_request(f"{where}.type: {kind!r} is not a user content block this server accepts", f"{where}.type")
    flush_text()
    if not out:
        out.append({"role": "user", "content": ""})
    return out


def _assistant_turn(content: Any, path: str) -> dict[str, Any]:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for where, kind, block in content_parts(content, path, "content blocks"):
        if kind == "text":
            texts.append(field(block, "text", "string", path=where, required=True))
        elif kind == "thinking":
            thinking.append(field(block, "thinking", "string", path=where, default=""))
        elif kind == "tool_use":
            name = field(block, "name", "string", path=where, required=True)
            args = field(block, "input", "object", path=where, default={})
            call_id = field(block, "id", "string", path=where)
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": dict(args)}})
        elif kind in ("redacted_thinking", "server_tool_use", "web_search_tool_result"):
            continue  # nothing a local model can read back
        else:
            raise bad_request(f"{where}.type: {kind!r} is not an assistant content block this server accepts", f"{where}.type")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thinking:
        msg["reasoning_content"] = "\n".join(thinking)
    if calls:
        msg["tool_calls"] = calls
    return msg


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = _text_blocks(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    messages = field(body, "messages", "array", required=True)
    if not messages:
        raise bad_request("messages: must hold at least one message", "messages")
    for i, m in enumerate(messages):
        path = f"messages[{i}]"
        expect(m, "object", path)
        role = field(m, "role", "string", path=path, required=True)
        if "content" not in m:
            raise bad_request(f"{path}.content: this field is required", f"{path}.content")
        if role == "user":
            out.extend(_user_turn(m["content"], join(path, "content")))
        elif role == "assistant":
            out.append(_assistant_turn(m["content"], join(path, "content")))
        else:
            raise bad_request(f"{path}.role: {role!r} is not 'user' or 'assistant' (put system text in 'system')", f"{path}.role")
    return out


def parse_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = field(body, "tools", "array")
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        path = f"tools[{i}]"
        expect(tool, "object", path)
        kind = field(tool, "type", "string", path=path)
        if kind not in (None, "custom"):
            continue  # Anthropic-hosted tools (web search, code execution) cannot run here
        name = field(tool, "name", "string", path=path, required=True)
        fn: dict[str, Any] = {"name": name}
        description = field(tool, "description", "string", path=path)
        if description is not None:
            fn["description"] = description
        fn["parameters"] = tool_schema(tool, "input_schema", path, default={"type": "object", "properties": {}})
        out.append({"type": "function", "function": fn})
    return out or None


def parse_tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> tuple[str, str | None, bool]:
    choice = field(body, "tool_choice", "object")
    if choice is None:
        return "auto", None, False
    kind = field(choice, "type", "string", path="tool_choice", required=True)
    single = bool(field(choice, "disable_parallel_tool_use", "boolean", path="tool_choice", default=False))
    if kind == "auto":
        return "auto", None, single
    if kind == "none":
        return "none", None, single
    if kind == "any":
        if not tools:
            raise bad_request("tool_choice: 'any' needs tools, and none were given", "tool_choice.type")
        return "required", None, single
    if kind == "tool":
        name = field(choice, "name", "string", path="tool_choice", required=True)
        if not any(t["function"]["name"] == name for t in tools or ()):
            raise bad_request(f"tool_choice.name: no tool named {name!r} in tools", "tool_choice.name")
        return "named", name, single
    raise bad_request(f"tool_choice.type: {kind!r} is not one of auto, any, tool, none", "tool_choice.type")


def parse_thinking(body: dict[str, Any]) -> bool | None:
    thinking = field(body, "thinking", "object")
    if thinking is None:
        return None
    kind = field(thinking, "type", "string", path="thinking", required=True)
    if kind not in ("enabled", "disabled", "adaptive", "between_tools"):
        raise bad_request(f"thinking.type: {kind!r} is not one of enabled, disabled, adaptive", "thinking.type")
    return kind != "disabled"


def parse_thinking_budget(body: dict[str, Any]) -> int | None:
    """`thinking.budget_tokens` when thinking is on (the thinking block ends there)."""
    thinking = field(body, "thinking", "object")
    if thinking is None or thinking.get("type") == "disabled":
        return None
    return field(thinking, "budget_tokens", "integer", path="thinking", minimum=0)


def parse_output_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """Anthropic's structured outputs (`output_format: {type: "json_schema", schema}`) in OpenAI's shape."""
    fmt = field(body, "output_format", "object")
    if fmt is None:
        return None
    kind = field(fmt, "type", "string", path="output_format", required=True)
    if kind != "json_schema":
        raise bad_request(f"output_format.type: {kind!r} is not 'json_schema'", "output_format.type")
    schema = field(fmt, "schema", "object", path="output_format", required=True)
    return checked_format({"type": "json_schema", "json_schema": {"schema": schema}}, "output_format")


def parse_request(body: dict[str, Any], *, for_count: bool = False) -> tuple[GenRequest, bool]:
    endpoint = "/v1/messages/count_tokens" if for_count else "/v1/messages"
    req = GenRequest(endpoint=endpoint, raw=body, messages=parse_messages(body))
    field(body, "model", "string")
    req.tools = parse_tools(body)
    req.tool_mode, req.tool_name, req.single_tool_call = parse_tool_choice(body, req.tools)
    req.enable_thinking = parse_thinking(body)
    req.thinking_budget = parse_thinking_budget(body)
    req.response_format = parse_output_format(body)
    if for_count:
        return req, False
    req.max_tokens = field(body, "max_tokens", "integer", required=True, minimum=1)
    stops = field(body, "stop_sequences", "array", default=[])
    for i, s in enumerate(stops):
        expect(s, "string", f"stop_sequences[{i}]")
    req.stop = list(stops)
    req.sampling = {
        "temperature": field(body, "temperature", "number", minimum=0, maximum=2),
        "top_p": field(body, "top_p", "number", above=0, maximum=1),
        "top_k": field(body, "top_k", "integer", minimum=0),
    }
    stream = field(body, "stream", "boolean", default=False)
    return req, stream


# ---- responses -----------------------------------------------------------------------------------
def _usage(reply: Reply, *, final: bool = True) -> dict[str, Any]:
    prompt, cached, completion = reply.usage_numbers()
    # Anthropic counts cache reads apart from input_tokens: their sum is the whole prompt.
    return {
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": completion if final else 0,
    }


async def messages(request: Request) -> Response:
    state, body = await request_body(request)
    req, stream = parse_request(body)
    job, reply = await start_job(state, req)
    ident = f"msg_{uuid.uuid4().hex}"
    model = model_name(state, body)
    if stream:
        return EventStreamResponse(_stream(state, job, reply, ident, model))
    return await json_reply(request, state, job, reply, lambda: _message(reply, ident, model))


def _message(reply: Reply, ident: str, model: str) -> dict[str, Any]:
    fin = reply.finish()
    content: list[dict[str, Any]] = []
    if reply.thinking_text:
        content.append({"type": "thinking", "thinking": reply.thinking_text, "signature": ""})
    if reply.content_text:
        content.append({"type": "text", "text": reply.content_text})
    for call in reply.calls:
        content.append({"type": "tool_use", "id": _tool_use_id(call.id), "name": call.name, "input": call.arguments})
    return {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(fin),
        "stop_sequence": fin.stop_sequence,
        "usage": _usage(reply),
    }


def _stream(state: ServerState, job: Job, reply: Reply, ident: str, model: str) -> AsyncIterator[str]:
    index = -1
    open_kind: str | None = None  # "thinking" | "text" | ("tool", call index)

    def start(kind: Any, block: dict[str, Any]) -> list[str]:
        nonlocal index, open_kind
        out = close()
        index += 1
        open_kind = kind
        out.append(sse_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        return out

    def close() -> list[str]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [sse_event("content_block_stop", {"type": "content_block_stop", "index": index})]

    def delta(d: dict[str, Any]) -> str:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})

    def render(item: Any) -> Iterator[str]:
        if isinstance(item, ThinkingDelta):
            if open_kind != "thinking":
                yield from start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            yield delta({"type": "thinking_delta", "thinking": item.text})
        elif isinstance(item, ContentDelta):
            if open_kind != "text":
                yield from start("text", {"type": "text", "text": ""})
            yield delta({"type": "text_delta", "text": item.text})
        elif isinstance(item, ToolCallStart):
            block = {"type": "tool_use", "id": _tool_use_id(item.id), "name": item.name, "input": {}}
            yield from start(("tool", item.index), block)
        elif isinstance(item, ToolCallArgsDelta):
            if open_kind == ("tool", item.index):
                yield delta({"type": "input_json_delta", "partial_json": item.text})
        elif isinstance(item, ToolCallEnd):
            if open_kind == ("tool", item.index):
                yield from close()
        elif isinstance(item, Done):
            yield from close()
            fin: Finish = reply.finish()
            yield sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason(fin), "stop_sequence": fin.stop_sequence},
                    "usage": _usage(reply),
                },
            )
            yield sse_event("message_stop", {"type": "message_stop"})

    start_usage = {"input_tokens": reply.req.prompt_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}
    message = {
        "id": ident, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": start_usage,
    }
    ping = sse_event("ping", {"type": "ping"})
    return stream_job(
        state,
        job,
        reply,
        render,
        ping=ping,
        error=lambda err: sse_event("error", err.anthropic_body()),
        first=[sse_event("message_start", {"type": "message_start", "message": message}), ping],
    )


async def count_tokens(request: Request) -> Response:
    """The prompt's token count, tokenized like a generation (so bounded by the queue), but a prompt
    longer than the context is still counted: that is the point of counting."""
    state, body = await request_body(request)
    req, _ = parse_request(body, for_count=True)
    with admit(state):
        await prepare(state, req, fit=False)
    return JSONResponse({"input_tokens": req.prompt_tokens})
