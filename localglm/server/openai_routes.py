"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Thinking comes back as `reasoning_content` (in messages and in stream deltas), as vLLM and
llama-server write it; GLM's XML tool calls come back as `tool_calls` whose arguments stream as
JSON text. Thinking can be turned off per request with `chat_template_kwargs: {enable_thinking:
false}` (vLLM, llama-server), `thinking: {type: "disabled"}` (Z.ai's API) or
`reasoning_effort: "none"`; other efforts bound the thinking block (grammar.budget.EFFORT_BUDGETS).
`response_format` json_object / json_schema holds the reply to JSON (localglm/grammar), and
tool_choice "required" / a named function is enforced while decoding. `custom` tools (free-form text
input, held to their `format` grammar) are shown to the model as a function of one string argument
and come back as `type: "custom"` calls, their input streamed whole at the call's end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..engine import Done
from ..grammar import CUSTOM_INPUT, GrammarError, InputGrammar, parse_response_format
from ..grammar.budget import EFFORT_BUDGETS
from ..sampling import REPETITION_PENALTY_RANGE  # SamplingParams' own bounds, so a 400 here and not a 500 there
from ..chat.stream_parser import ContentDelta, ThinkingDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart
from .chat import Finish, GenRequest, Reply, allowed_tools, content_text, custom_input, custom_tool, json_reply, model_name, request_body, start_job, stream_job
from .errors import APIError, bad_request
from .sse import EventStreamResponse, sse_data
from .state import ServerState
from .validation import call_arguments, describe, expect, field, join, string_or_list, tool_schema
from .worker import Job

FINGERPRINT = "localglm"


# ---- request parsing -----------------------------------------------------------------------------
def _non_text_part(where: str, kind: str, part: Any) -> str:
    if kind == "refusal":
        return field(part, "refusal", "string", path=where, default="")
    raise bad_request(f"{where}.type: {kind!r} parts are not supported: this model reads text only", f"{where}.type")


def _content_text(value: Any, path: str) -> str:
    """Message content: a string or an array of text parts (other part types are refused)."""
    return content_text(value, path, "content parts", _non_text_part, bare_strings=True)


def _tool_call(call: Any, path: str, custom: set[str]) -> dict[str, Any]:
    """An assistant message's tool call as the template reads it; a custom one's `input` as the one argument
    its tool is shown with (its name goes into `custom`)."""
    expect(call, "object", path)
    if field(call, "type", "string", path=path, default="function") == "custom":
        c = field(call, "custom", "object", path=path, required=True)
        cpath = join(path, "custom")
        name = field(c, "name", "string", path=cpath, required=True)
        custom.add(name)
        out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": {CUSTOM_INPUT: field(c, "input", "string", path=cpath, default="")}}}
    else:
        fn = field(call, "function", "object", path=path, required=True)
        fpath = join(path, "function")
        name = field(fn, "name", "string", path=fpath, required=True)
        out = {"type": "function", "function": {"name": name, "arguments": call_arguments(fn.get("arguments"), join(fpath, "arguments"))}}
    call_id = field(call, "id", "string", path=path)
    if call_id is not None:
        out["id"] = call_id
    return out


def parse_messages(body: dict[str, Any], custom: set[str] | None = None) -> list[dict[str, Any]]:
    """The messages as the template reads them; the names of custom tools called in them go into `custom`."""
    custom = set() if custom is None else custom
    messages = field(body, "messages", "array", required=True)
    if not messages:
        raise bad_request("messages: must hold at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        path = f"messages[{i}]"
        expect(m, "object", path)
        role = field(m, "role", "string", path=path, required=True)
        role = {"developer": "system", "function": "tool"}.get(role, role)
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"{path}.role: {role!r} is not one of system, developer, user, assistant, tool", f"{path}.role")
        msg: dict[str, Any] = {"role": role, "content": _content_text(m.get("content"), join(path, "content"))}
        if role == "assistant":
            for key in ("reasoning_content", "reasoning"):
                reasoning = field(m, key, "string", path=path)
                if reasoning:
                    msg["reasoning_content"] = reasoning
                    break
            calls = field(m, "tool_calls", "array", path=path)
            if calls:
                msg["tool_calls"] = [_tool_call(c, join(join(path, "tool_calls"), j), custom) for j, c in enumerate(calls)]
        elif role == "tool":
            call_id = field(m, "tool_call_id", "string", path=path)
            if call_id is not None:
                msg["tool_call_id"] = call_id
        out.append(msg)
    return out


def parse_tools(body: dict[str, Any], custom: dict[str, InputGrammar | None] | None = None) -> list[dict[str, Any]] | None:
    """The request's tools in OpenAI function form, function tools as sent (the prompt shows the client's own
    schema text, the same every turn). `custom` given (chat completions): `custom` tools too, shown as a
    function of one string argument, their names and input grammars put in `custom`; else they are refused."""
    tools = field(body, "tools", "array")
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        path = f"tools[{i}]"
        expect(tool, "object", path)
        kind = field(tool, "type", "string", path=path, default="function")
        if kind == "custom" and custom is not None:
            c = field(tool, "custom", "object", path=path, required=True)
            cpath = join(path, "custom")
            name = field(c, "name", "string", path=cpath, required=True)
            if not name:
                raise bad_request(f"{cpath}.name: must not be empty", f"{cpath}.name")
            shown, custom[name] = custom_tool(name, field(c, "description", "string", path=cpath), c.get("format"), join(cpath, "format"))
            out.append(shown)
            continue
        if kind != "function":
            allowed = "'function' and 'custom'" if custom is not None else "only 'function'"
            raise bad_request(f"{path}.type: {allowed} tools are supported, got {kind!r}", f"{path}.type")
        fn = field(tool, "function", "object", path=path, required=True)
        fpath = join(path, "function")
        if not field(fn, "name", "string", path=fpath, required=True):
            raise bad_request(f"{fpath}.name: must not be empty", f"{fpath}.name")
        field(fn, "description", "string", path=fpath)
        tool_schema(fn, "parameters", fpath)
        out.append(tool)
    return out


def parse_tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> tuple[str, str | None, list[dict[str, Any]] | None]:
    """(mode, named tool, the tools it leaves): "none" | "auto" | "required" | {type: function | custom, name}
    | {type: "allowed_tools", allowed_tools: {mode, tools}} (the tools the model may call, as `tools` lists them)."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto", None, tools
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice: {choice!r} is not one of none, auto, required", "tool_choice")
        mode, name = choice, None
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":  # {type, allowed_tools: {mode, tools}}
        return allowed_tools(field(choice, "allowed_tools", "object", path="tool_choice", required=True), "tool_choice.allowed_tools", tools, _listed_name)
    elif isinstance(choice, dict):
        kind = "custom" if field(choice, "type", "string", path="tool_choice", default="function") == "custom" else "function"
        fn = field(choice, kind, "object", path="tool_choice", required=True)
        name = field(fn, "name", "string", path=f"tool_choice.{kind}", required=True)
        mode = "named"
        if not any(t["function"]["name"] == name for t in tools or ()):
            raise bad_request(f"tool_choice.{kind}.name: no tool named {name!r} in tools", f"tool_choice.{kind}.name")
    else:
        raise bad_request(f"tool_choice: expected a string or an object, got {describe(choice)}", "tool_choice")
    if mode in ("required", "named") and not tools:
        raise bad_request(f"tool_choice: {mode!r} needs tools, and none were given", "tool_choice")
    return mode, name, tools


def _listed_name(tool: dict[str, Any], path: str) -> str:
    """A chat completions allowed_tools entry's name: {type: function | custom, function | custom: {name}}."""
    kind = "custom" if field(tool, "type", "string", path=path, default="function") == "custom" else "function"
    return field(field(tool, kind, "object", path=path, required=True), "name", "string", path=join(path, kind), required=True)


def parse_sampling(body: dict[str, Any]) -> dict[str, Any]:
    top_k = field(body, "top_k", "integer", minimum=-1)
    field(body, "presence_penalty", "number", minimum=-2, maximum=2)  # accepted, not applied
    field(body, "frequency_penalty", "number", minimum=-2, maximum=2)  # accepted, not applied
    return {
        "temperature": field(body, "temperature", "number", minimum=0, maximum=2),
        "top_p": field(body, "top_p", "number", above=0, maximum=1),
        "top_k": 0 if top_k == -1 else top_k,
        "min_p": field(body, "min_p", "number", minimum=0, maximum=0.999999),
        "repetition_penalty": field(
            body, "repetition_penalty", "number", minimum=REPETITION_PENALTY_RANGE[0], maximum=REPETITION_PENALTY_RANGE[1]
        ),
        "seed": field(body, "seed", "integer", minimum=-(2**63), maximum=2**64 - 1),
    }


def parse_thinking(body: dict[str, Any]) -> bool | None:
    """A per-request thinking switch, in any of the spellings OpenAI-style servers accept."""
    kwargs = field(body, "chat_template_kwargs", "object")
    if kwargs:
        flag = field(kwargs, "enable_thinking", "boolean", path="chat_template_kwargs")
        if flag is not None:
            return flag
    flag = field(body, "enable_thinking", "boolean")
    if flag is not None:
        return flag
    thinking = field(body, "thinking", "object")
    if thinking:
        kind = field(thinking, "type", "string", path="thinking", required=True)
        if kind not in ("enabled", "disabled", "auto"):
            raise bad_request(f"thinking.type: {kind!r} is not one of enabled, disabled, auto", "thinking.type")
        if kind != "auto":
            return kind == "enabled"
    effort = field(body, "reasoning_effort", "string")
    if effort is not None:
        return effort != "none"
    return None


def parse_clear_thinking(body: dict[str, Any]) -> bool | None:
    """Whether earlier turns' reasoning is dropped from the prompt: `chat_template_kwargs.clear_thinking`
    (vLLM, SGLang) or Z.ai's `thinking.clear_thinking`; None: the server's default."""
    kwargs = field(body, "chat_template_kwargs", "object")
    flag = field(kwargs, "clear_thinking", "boolean", path="chat_template_kwargs") if kwargs else None
    thinking = field(body, "thinking", "object")
    if flag is None and thinking:
        flag = field(thinking, "clear_thinking", "boolean", path="thinking")
    return flag


def parse_effort_budget(body: dict[str, Any]) -> int | None:
    """The thinking budget `reasoning_effort` asks for (None: unbounded, or thinking is off)."""
    effort = field(body, "reasoning_effort", "string")
    if effort is None or effort == "none":
        return None
    if effort not in EFFORT_BUDGETS:
        raise bad_request(f"reasoning_effort: {effort!r} is not one of none, {', '.join(EFFORT_BUDGETS)}", "reasoning_effort")
    return EFFORT_BUDGETS[effort]


def parse_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """`response_format`, checked (400 naming the field); None for text."""
    fmt = body.get("response_format")
    try:
        return fmt if parse_response_format(fmt) is not None else None
    except GrammarError as exc:
        raise bad_request(str(exc), exc.param) from None


def _common(body: dict[str, Any], req: GenRequest) -> tuple[bool, bool]:
    """Fields of both endpoints; returns (stream, include_usage)."""
    req.sampling = parse_sampling(body)
    req.stop = string_or_list(body, "stop")
    n = field(body, "n", "integer", default=1)
    if n != 1:
        raise bad_request(f"n: only 1 choice per request is supported, got {n}", "n")
    stream = field(body, "stream", "boolean", default=False)
    options = field(body, "stream_options", "object") or {}
    include_usage = bool(field(options, "include_usage", "boolean", path="stream_options", default=False))
    field(body, "model", "string")
    return stream, include_usage


def parse_chat(body: dict[str, Any]) -> tuple[GenRequest, bool, bool]:
    called: set[str] = set()
    req = GenRequest(endpoint="/v1/chat/completions", raw=body, messages=parse_messages(body, called))
    stream, include_usage = _common(body, req)
    custom: dict[str, InputGrammar | None] = {}
    req.tools = parse_tools(body, custom)
    req.custom_tools = frozenset(custom) | frozenset(called)
    req.tool_formats = {name: g for name, g in custom.items() if g is not None}
    req.tool_mode, req.tool_name, req.tools = parse_tool_choice(body, req.tools)
    req.single_tool_call = field(body, "parallel_tool_calls", "boolean", default=True) is False
    req.enable_thinking = parse_thinking(body)
    req.clear_thinking = parse_clear_thinking(body)
    req.thinking_budget = parse_effort_budget(body)
    max_tokens = field(body, "max_tokens", "integer", minimum=1)
    req.max_tokens = field(body, "max_completion_tokens", "integer", minimum=1, default=max_tokens)
    if field(body, "logprobs", "boolean", default=False):
        raise bad_request("logprobs: not supported by this server", "logprobs")
    req.response_format = parse_format(body)
    return req, stream, include_usage


def parse_completion(body: dict[str, Any]) -> tuple[GenRequest, bool, bool, bool]:
    req = GenRequest(endpoint="/v1/completions", raw=body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        req.input_ids = list(prompt)
    elif prompt is None:
        raise bad_request("prompt: this field is required", "prompt")
    else:
        raise bad_request("prompt: expected a string, an array of token ids, or an array holding one of those", "prompt")
    stream, include_usage = _common(body, req)
    req.max_tokens = field(body, "max_tokens", "integer", minimum=1, default=16)
    req.response_format = parse_format(body)  # as vLLM: the completion text is held to JSON
    echo = field(body, "echo", "boolean", default=False)
    if field(body, "suffix", "string"):
        raise bad_request("suffix: not supported by this server", "suffix")
    if field(body, "logprobs", "integer"):
        raise bad_request("logprobs: not supported by this server", "logprobs")
    if field(body, "best_of", "integer", default=1) != 1:
        raise bad_request("best_of: only 1 is supported", "best_of")
    return req, stream, include_usage, echo


# ---- responses -----------------------------------------------------------------------------------
def finish_reason(fin: Finish) -> str:
    return {"stop_sequence": "stop"}.get(fin.reason, fin.reason)


def usage(reply: Reply) -> dict[str, Any]:
    prompt, cached, completion = reply.usage_numbers()
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


@dataclass(frozen=True)
class _Head:
    """What every object of one response (or of each chunk of its stream) starts with."""

    ident: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, state: ServerState, body: dict[str, Any]) -> _Head:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model_name(state, body))

    def fields(self, kind: str) -> dict[str, Any]:
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": FINGERPRINT}

    def whole(self, kind: str, choice: dict[str, Any], reply: Reply) -> dict[str, Any]:
        """The whole (non-streaming) response."""
        return {**self.fields(kind), "choices": [choice], "usage": usage(reply), "timings": reply.timings()}


def _stream(
    state: ServerState,
    job: Job,
    reply: Reply,
    base: dict[str, Any],
    include_usage: bool,
    render: Callable[[Any], Iterable[str]],
    first: list[str],
) -> AsyncIterator[str]:
    """An OpenAI stream: `render`'s chunks, the final usage chunk when asked for, then [DONE]."""

    def render_all(item: Any) -> Iterator[str]:
        yield from render(item)
        if isinstance(item, Done) and include_usage:
            yield sse_data({**base, "choices": [], "usage": usage(reply)})

    return stream_job(
        state,
        job,
        reply,
        render_all,
        ping=": keep-alive\n\n",
        error=lambda err: sse_data(err.openai_body()),
        first=first,
        last="data: [DONE]\n\n",
    )


async def chat_completions(request: Request) -> Response:
    state, body = await request_body(request)
    req, stream, include_usage = parse_chat(body)
    job, reply = await start_job(state, req)
    head = _Head.new("chatcmpl", state, body)
    if stream:
        return EventStreamResponse(_chat_stream(state, job, reply, head, include_usage, req.custom_tools))
    return await json_reply(request, state, job, reply, lambda: _chat_completion(reply, head, req.custom_tools))


def _call(call_id: str | None, name: str | None, text: str, custom: bool) -> dict[str, Any]:
    """A tool call, or a streamed piece of one (None for what the piece leaves out), in the chat API's shape: a
    function's JSON arguments, or a custom tool's text input (`type: "custom"`, as OpenAI returns and streams it)."""
    kind = "custom" if custom else "function"
    body: dict[str, Any] = {"input" if custom else "arguments": text}
    if name is not None:
        body = {"name": name, **body}
    if call_id is None:
        return {kind: body}
    return {"id": call_id, "type": kind, kind: body}


def _chat_completion(reply: Reply, head: _Head, custom: frozenset[str] = frozenset()) -> dict[str, Any]:
    fin = reply.finish()
    message: dict[str, Any] = {"role": "assistant", "content": reply.content_text}
    if reply.thinking_text:
        message["reasoning_content"] = reply.thinking_text
    if reply.calls:
        message["tool_calls"] = [
            _call(c.id, c.name, custom_input(c.arguments), True) if c.name in custom else _call(c.id, c.name, c.arguments_json, False)
            for c in reply.calls
        ]
        message["content"] = reply.content_text or None
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(fin)}
    return head.whole("chat.completion", choice, reply)


def _chat_stream(
    state: ServerState, job: Job, reply: Reply, head: _Head, include_usage: bool, custom: frozenset[str] = frozenset()
) -> AsyncIterator[str]:
    base = head.fields("chat.completion.chunk")
    custom_calls: set[int] = set()  # indexes of the calls to custom tools: their input comes whole, at the call's end

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return sse_data({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    def render(item: Any) -> Iterator[str]:
        if isinstance(item, ThinkingDelta):
            yield chunk({"reasoning_content": item.text})
        elif isinstance(item, ContentDelta):
            yield chunk({"content": item.text})
        elif isinstance(item, ToolCallStart):
            if item.name in custom:
                custom_calls.add(item.index)
            yield chunk({"tool_calls": [{"index": item.index, **_call(item.id, item.name, "", item.index in custom_calls)}]})
        elif isinstance(item, ToolCallArgsDelta) and item.index not in custom_calls:
            yield chunk({"tool_calls": [{"index": item.index, **_call(None, None, item.text, False)}]})
        elif isinstance(item, ToolCallEnd) and item.index in custom_calls:
            yield chunk({"tool_calls": [{"index": item.index, **_call(None, None, custom_input(item.call.arguments), True)}]})
        elif isinstance(item, Done):
            yield chunk({}, finish_reason(reply.finish()), timings=reply.timings())

    return _stream(state, job, reply, base, include_usage, render, [chunk({"role": "assistant", "content": ""})])


async def completions(request: Request) -> Response:
    state, body = await request_body(request)
    req, stream, include_usage, echo = parse_completion(body)
    job, reply = await start_job(state, req)
    head = _Head.new("cmpl", state, body)
    prefix = ""
    if echo:
        prefix = req.prompt if req.prompt is not None else state.model.tokenizer.decode(req.input_ids or [])
    if stream:
        return EventStreamResponse(_completion_stream(state, job, reply, head, include_usage, prefix))
    return await json_reply(request, state, job, reply, lambda: _completion(reply, head, prefix))


def _completion(reply: Reply, head: _Head, prefix: str) -> dict[str, Any]:
    choice = {"index": 0, "text": prefix + reply.content_text, "logprobs": None, "finish_reason": finish_reason(reply.finish())}
    return head.whole("text_completion", choice, reply)


def _completion_stream(
    state: ServerState, job: Job, reply: Reply, head: _Head, include_usage: bool, prefix: str
) -> AsyncIterator[str]:
    base = head.fields("text_completion")

    def chunk(text: str, finish: str | None = None, **extra: Any) -> str:
        return sse_data({**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra})

    def render(item: Any) -> Iterator[str]:
        if isinstance(item, ContentDelta):
            yield chunk(item.text)
        elif isinstance(item, Done):
            yield chunk("", finish_reason(reply.finish()), timings=reply.timings())

    return _stream(state, job, reply, base, include_usage, render, [chunk(prefix)] if prefix else [])


def _model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.settings.model_name,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "localglm",
        "context_length": state.model.ctx,
    }


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request) -> Response:
    state: ServerState = request.app.state.server
    name = request.path_params["model_id"]
    if name != state.settings.model_name:
        raise APIError(404, f"model {name!r} not found; this server serves {state.settings.model_name!r}", param="model", code="model_not_found")
    return JSONResponse(_model_card(state))
