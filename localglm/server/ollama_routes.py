"""Ollama-compatible routes: POST /api/chat and /api/generate (streaming by default, as Ollama's), GET
/api/tags, POST /api/show, GET /api/ps and GET /api/version.

Why: editors and tools whose local-model setting speaks Ollama's own API (Zed, JetBrains AI Assistant,
Continue's and VS Code Copilot's Ollama providers, Open WebUI, the `ollama` SDKs) then work with
`localglm serve --port 11434` unchanged. Streams are newline-delimited JSON objects (no heartbeats:
Ollama's clients parse every line as JSON); GLM's thinking comes back as `thinking` (set `think`
to true / false, or an effort), tool calls as `message.tool_calls` with arguments as objects, each
sent whole once the model has finished writing it, as Ollama sends them. `format` ("json" or a JSON
schema) holds the reply to JSON through the same grammar as the other routes. `/api/show` reports
the served context (`--ctx`), which is what a client must size its prompts by. This server runs the
one model it loaded: requests may name any model, and pull / create / delete do not exist here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from typing import Any

import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat.stream_parser import ContentDelta, ThinkingDelta, ToolCallEnd
from ..engine import Done
from ..grammar.budget import EFFORT_BUDGETS
from ..sampling import REPETITION_PENALTY_RANGE
from .chat import GenRequest, Reply, checked_format, json_reply, model_name, request_body, start_job, stream_job
from .errors import bad_request
from .openai_routes import parse_tools
from .sse import EventStreamResponse, dumps
from .state import ServerState
from .validation import describe, expect, field, join, string_or_list
from .worker import Job

OLLAMA_VERSION = "0.13.0"  # the Ollama release whose API these routes follow (clients gate features on /api/version)
NDJSON = "application/x-ndjson"
THINK_LEVELS = ("low", "medium", "high")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ---- request parsing ----------------------------------------------------------------------------
def _no_images(obj: dict[str, Any], path: str) -> None:
    if field(obj, "images", "array", path=path):
        raise bad_request(f"{join(path, 'images')}: this model reads text only", join(path, "images"))


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Ollama chat messages -> GLM chat messages (thinking as reasoning_content, argument objects kept)."""
    out = []
    for i, m in enumerate(field(body, "messages", "array", default=[])):
        path = f"messages[{i}]"
        expect(m, "object", path)
        role = field(m, "role", "string", path=path, required=True)
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"{path}.role: {role!r} is not one of system, user, assistant, tool", f"{path}.role")
        _no_images(m, path)
        msg: dict[str, Any] = {"role": role, "content": field(m, "content", "string", path=path, default="")}
        if role == "assistant":
            thinking = field(m, "thinking", "string", path=path)
            if thinking:
                msg["reasoning_content"] = thinking
            calls = []
            for j, call in enumerate(field(m, "tool_calls", "array", path=path, default=[])):
                cpath = join(join(path, "tool_calls"), j)
                expect(call, "object", cpath)
                fn = field(call, "function", "object", path=cpath, required=True)
                name = field(fn, "name", "string", path=join(cpath, "function"), required=True)
                args = field(fn, "arguments", "object", path=join(cpath, "function"), default={})
                calls.append({"type": "function", "function": {"name": name, "arguments": dict(args)}})
            if calls:
                msg["tool_calls"] = calls
        elif role == "tool":
            name = field(m, "tool_name", "string", path=path)
            if name:
                msg["name"] = name
        out.append(msg)
    return out


def parse_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """`format`: "json" or a JSON schema, in the chat route's `response_format` shape."""
    fmt = body.get("format")
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        converted: dict[str, Any] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        converted = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    else:
        raise bad_request(f"format: expected \"json\" or a JSON schema object, got {describe(fmt)}", "format")
    return checked_format(converted, "format")


def parse_think(body: dict[str, Any]) -> tuple[bool | None, int | None]:
    """`think`: true / false, or an effort ("low", "medium", "high") that also bounds the thinking."""
    think = body.get("think")
    if think is None or isinstance(think, bool):
        return think, None
    if think in THINK_LEVELS:
        return True, EFFORT_BUDGETS[think]
    raise bad_request(f"think: expected true, false or one of {', '.join(THINK_LEVELS)}, got {think!r}", "think")


def parse_options(body: dict[str, Any], req: GenRequest) -> None:
    """`options`: the sampling and length settings Ollama takes (the rest, such as num_ctx or num_gpu, are
    the server's to choose and are ignored here, as `--ctx` and `--device` fixed them at start)."""
    opts = field(body, "options", "object", default={})
    top_k = field(opts, "top_k", "integer", path="options", minimum=0)
    req.sampling = {
        "temperature": field(opts, "temperature", "number", path="options", minimum=0, maximum=2),
        "top_p": field(opts, "top_p", "number", path="options", above=0, maximum=1),
        "top_k": top_k,
        "min_p": field(opts, "min_p", "number", path="options", minimum=0, maximum=0.999999),
        "repetition_penalty": field(opts, "repeat_penalty", "number", path="options",
                                    minimum=REPETITION_PENALTY_RANGE[0], maximum=REPETITION_PENALTY_RANGE[1]),  # fmt: skip
        "seed": field(opts, "seed", "integer", path="options", minimum=-(2**63), maximum=2**64 - 1),
    }
    n = field(opts, "num_predict", "integer", path="options", minimum=-2)
    if n == 0:
        raise bad_request("options.num_predict: must be -1 (no limit), -2 (fill the context) or at least 1", "options.num_predict")
    req.max_tokens = n if n is not None and n > 0 else None
    req.stop = string_or_list(opts, "stop", path="options")


def _common(body: dict[str, Any], req: GenRequest) -> bool:
    """Fields of both endpoints; returns `stream` (Ollama's default: true)."""
    field(body, "model", "string")
    parse_options(body, req)
    req.response_format = parse_format(body)
    req.enable_thinking, req.thinking_budget = parse_think(body)
    return bool(field(body, "stream", "boolean", default=True))


def parse_chat(body: dict[str, Any]) -> tuple[GenRequest, bool]:
    req = GenRequest(endpoint="/api/chat", raw=body, messages=parse_messages(body))
    stream = _common(body, req)
    req.tools = parse_tools(body)
    return req, stream


def parse_generate(body: dict[str, Any]) -> tuple[GenRequest, bool]:
    prompt = field(body, "prompt", "string", default="")
    for key in ("suffix", "template"):
        if field(body, key, "string"):
            raise bad_request(f"{key}: not supported by this server (the model's own chat template is used)", key)
    if body.get("context"):
        raise bad_request("context: the deprecated context tokens are not supported; send the conversation to /api/chat", "context")
    _no_images(body, "")
    if field(body, "raw", "boolean", default=False):
        req = GenRequest(endpoint="/api/generate", raw=body, prompt=prompt)
    else:
        system = field(body, "system", "string")
        req = GenRequest(endpoint="/api/generate", raw=body, messages=[*([{"role": "system", "content": system}] if system else []),
                                                                        {"role": "user", "content": prompt}])  # fmt: skip
    return req, _common(body, req)


# ---- responses ----------------------------------------------------------------------------------
def _done_fields(reply: Reply, started: float) -> dict[str, Any]:
    prompt, _, completion = reply.usage_numbers()
    s = reply.done.stats if reply.done is not None else None
    ns = 1_000_000_000
    return {
        "done": True,
        "done_reason": "length" if reply.finish().reason == "length" else "stop",
        "total_duration": int((time.perf_counter() - started) * ns),
        "load_duration": 0,
        "prompt_eval_count": prompt,
        "prompt_eval_duration": int(s.prompt_s * ns) if s is not None else 0,
        "eval_count": completion,
        "eval_duration": int(s.decode_s * ns) if s is not None else 0,
    }


def _tool_calls(calls: list[Any]) -> list[dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _loaded(body: dict[str, Any], model: str, chat: bool) -> Response:
    """A request with nothing to generate: Ollama's way of loading a model (done_reason "load"), or with
    keep_alive 0 of unloading it ("unload"; the one model here stays loaded for the server's lifetime)."""
    out: dict[str, Any] = {"model": model, "created_at": _now()}
    out.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return JSONResponse({**out, "done": True, "done_reason": "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"})


async def chat(request: Request) -> Response:
    state, body = await request_body(request)
    req, stream = parse_chat(body)
    model = model_name(state, body)
    if not req.messages:
        return _loaded(body, model, chat=True)
    return await _run(request, state, req, stream, model, chat=True)


async def generate(request: Request) -> Response:
    state, body = await request_body(request)
    req, stream = parse_generate(body)
    model = model_name(state, body)
    if not body.get("prompt") and not body.get("system"):
        return _loaded(body, model, chat=False)
    return await _run(request, state, req, stream, model, chat=False)


async def _run(request: Request, state: ServerState, req: GenRequest, stream: bool, model: str, *, chat: bool) -> Response:
    started = time.perf_counter()
    job, reply = await start_job(state, req)
    if stream:
        return EventStreamResponse(_stream(state, job, reply, model, chat, started), media_type=NDJSON)

    def whole() -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "created_at": _now()}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": reply.content_text}
            if reply.thinking_text:
                message["thinking"] = reply.thinking_text
            if reply.calls:
                message["tool_calls"] = _tool_calls(reply.calls)
            out["message"] = message
        else:
            out["response"] = reply.content_text
            if reply.thinking_text:
                out["thinking"] = reply.thinking_text
        return {**out, **_done_fields(reply, started)}

    return await json_reply(request, state, job, reply, whole)


def _stream(state: ServerState, job: Job, reply: Reply, model: str, chat: bool, started: float) -> AsyncIterator[str]:
    def line(obj: dict[str, Any]) -> str:
        return dumps(obj) + "\n"

    def piece(**fields: Any) -> str:
        head = {"model": model, "created_at": _now()}
        if chat:
            return line({**head, "message": {"role": "assistant", "content": "", **fields}, "done": False})
        return line({**head, "response": fields.pop("content", ""), **fields, "done": False})

    def render(item: Any) -> Iterator[str]:
        if isinstance(item, ThinkingDelta):
            yield piece(thinking=item.text)
        elif isinstance(item, ContentDelta):
            yield piece(content=item.text)
        elif isinstance(item, ToolCallEnd) and chat:
            yield piece(tool_calls=_tool_calls([item.call]))
        elif isinstance(item, Done):
            last: dict[str, Any] = {"model": model, "created_at": _now()}
            last.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
            yield line({**last, **_done_fields(reply, started)})

    return stream_job(state, job, reply, render, ping="", error=lambda err: line({"error": err.message}))


# ---- the model ----------------------------------------------------------------------------------
def _details(state: ServerState) -> dict[str, Any]:
    from ..model_info import count_params, human_count, read_checkpoint

    cfg = state.model.config
    try:
        info = read_checkpoint(state.model.path)
        kind, size, level = info.kind, info.disk_bytes, (info.stored.label.split(",")[0] if info.stored else str(state.model.dtype).removeprefix("torch."))
    except Exception:  # a model built in memory (tests) or moved since loading: describe what is loaded
        kind, size, level = "safetensors", 0, str(state.model.dtype).removeprefix("torch.")
    total = count_params(cfg).total
    details = {"parent_model": "", "format": "gguf" if kind == "gguf" else "safetensors", "family": cfg.model_type,
               "families": [cfg.model_type], "parameter_size": human_count(total), "quantization_level": level}  # fmt: skip
    return {"details": details, "size": size, "parameters": total}


def _started(state: ServerState) -> str:
    return datetime.fromtimestamp(state.started_at, timezone.utc).isoformat().replace("+00:00", "Z")


def _card(state: ServerState) -> dict[str, Any]:
    name = state.settings.model_name
    d = _details(state)
    digest = hashlib.sha256(f"{state.model.path}:{d['size']}".encode()).hexdigest()
    return {"name": name, "model": name, "modified_at": _started(state), "size": d["size"], "digest": digest, "details": d["details"]}


async def tags(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse({"models": [_card(state)]})


async def ps(request: Request) -> Response:
    state: ServerState = request.app.state.server
    card = _card(state)
    device = state.model.device
    vram = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # what this process holds on the GPU
    # expires_at far ahead: the one model stays loaded for the server's lifetime (Ollama's keep_alive -1 looks the same)
    return JSONResponse({"models": [{**card, "expires_at": "2999-01-01T00:00:00Z", "size_vram": vram, "context_length": state.model.ctx}]})


async def show(request: Request) -> Response:
    state, body = await request_body(request)
    if not (field(body, "model", "string") or field(body, "name", "string")):
        raise bad_request("model: this field is required", "model")
    cfg, d = state.model.config, _details(state)
    arch = cfg.model_type
    info = {
        "general.architecture": arch,
        "general.parameter_count": d["parameters"],
        f"{arch}.context_length": state.model.ctx,  # the served context, not the trained one: what prompts must fit
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.expert_count": cfg.n_routed_experts,
        f"{arch}.expert_used_count": cfg.num_experts_per_tok,
    }
    tokenizer = state.model.tokenizer
    template = getattr(tokenizer, "chat_template", None) or ""
    return JSONResponse({
        "modelfile": f"# served by localglm from {state.model.path}\nFROM {state.model.path}\n",
        "parameters": "", "template": template if isinstance(template, str) else "",
        "details": d["details"], "model_info": info,
        "capabilities": ["completion", "tools", "thinking"],
        "modified_at": _started(state),  # not _card's: that would read the checkpoint's headers a second time
    })  # fmt: skip


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})
