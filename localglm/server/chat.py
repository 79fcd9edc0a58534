"""What the OpenAI and Anthropic routes share: a normalized request, queueing, and the reply.

Each route parses its API's JSON into a `GenRequest` (GLM chat messages in the OpenAI shape the
chat template reads, tools in OpenAI function form), then `start_job` takes a place in the queue
(503 when it is full), renders and tokenizes the prompt off the event loop (one prompt at a time),
refuses one that does not fit the context (400, from its length alone when it is far too long),
and queues the job with the prompt's ids, so the engine does not tokenize it again. There too the
request's constraints become one logits processor (localglm/grammar: response_format JSON, tool
calls held to GLM's format and to tool_choice, the thinking budget), so a bad schema is a 400. `Reply`
filters and accumulates the engine's events: it drops tool calls when tool_choice is "none" (and
all but the first when parallel calls are off), and turns the engine's finish reason into stop /
length / tool_calls / stop_sequence. `json_reply` and `stream_job` carry a job to its response
(whole, or as server-sent events), cancelling it when the client goes away; `content_parts` and `content_text` read message content in both APIs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat.stream_parser import ContentDelta, ThinkingDelta, ToolCall, ToolCallArgsDelta, ToolCallEnd, ToolCallStart
from ..engine import Done, EncodedChat, LogitsProcessor, PromptTooLong
from ..errors import LocalGLMError
from ..grammar import CUSTOM_INPUT, GrammarError, InputGrammar, chain, parse_input_format, parse_response_format
from . import validation
from .body import read_json
from .errors import APIError, bad_request
from .sse import until_disconnect
from .state import ServerState
from .validation import describe, expect, join
from .worker import HEARTBEAT, Admission, Job, JobError, QueueFull, ShuttingDown

IMAGE_PLACEHOLDER = "[image omitted: this model reads text only]"  # an image in a tool's result (the rest is kept)
# GLM's role tags written as plain text (not as their special-token ids, which stop generation by
# id) also end the assistant turn: the parser never shows them, and these stop strings make the
# engine stop generating instead of running on to max_tokens.
ROLE_STOP_STRINGS = ("<|user|>", "<|observation|>", "<|endoftext|>", "<|system|>", "<|assistant|>")


@dataclass
class GenRequest:
    endpoint: str
    raw: dict[str, Any]  # the request JSON (given to the test hook)
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    input_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI function form, rendered by the template
    tool_mode: str = "auto"  # auto | none | required | named
    tool_name: str | None = None  # the named tool (tool_mode "named")
    single_tool_call: bool = False
    tool_formats: dict[str, InputGrammar] = field(default_factory=dict)  # custom tools' input grammars, by name
    custom_tools: frozenset[str] = frozenset()  # tools whose calls are answered as custom (free-form) calls
    enable_thinking: bool | None = None  # None: the server's default
    clear_thinking: bool | None = None  # False: keep earlier turns' reasoning (GLM-4.7 / 5.x preserved thinking); None: the server's default
    max_tokens: int | None = None  # None: up to the end of the context
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)  # the client's stop strings
    prompt_tokens: int = 0
    encoded: EncodedChat | list[int] | None = None  # the tokenized prompt (chat, or raw), set by `prepare`
    response_format: dict[str, Any] | None = None  # OpenAI's shape: {"type": "json_object" | "json_schema", ...}
    thinking_budget: int | None = None  # thinking tokens before `</think>` is forced
    constraint: LogitsProcessor | None = None  # the grammar / budget processor, set by `prepare`

    @property
    def chat(self) -> bool:
        return self.messages is not None


async def request_body(request: Request) -> tuple[ServerState, dict[str, Any]]:
    """The server's state and the request's JSON object (415 / 413 / 408 / 400 raised here)."""
    state: ServerState = request.app.state.server
    settings = state.settings
    return state, await read_json(request, settings.body_limit(state.model.ctx), settings.body_timeout_s)


def model_name(state: ServerState, body: dict[str, Any]) -> str:
    """The model a response names: the one the request asked for, else the served model's name."""
    name = body.get("model")
    return name if isinstance(name, str) and name else state.settings.model_name


def content_parts(value: Any, path: str, noun: str, *, bare_strings: bool = False) -> Iterator[tuple[str, str, Any]]:
    """Message content as (path, type, part) triples, checked as they are read: a string is one text
    part; an array's parts must be objects with a string `type` (with `bare_strings`, a plain string
    in the array is a text part too); anything else is a 400 naming `noun`."""
    if isinstance(value, str):
        yield path, "text", {"text": value}
        return
    if not isinstance(value, list):
        raise bad_request(f"{path}: expected a string or an array of {noun}, got {describe(value)}", path)
    for j, part in enumerate(value):
        where = join(path, j)
        if bare_strings and isinstance(part, str):
            yield where, "text", {"text": part}
            continue
        expect(part, "object", where)
        yield where, validation.field(part, "type", "string", path=where, required=True), part


def content_text(
    value: Any, path: str, noun: str, other: Callable[[str, str, Any], str], *, bare_strings: bool = False
) -> str:
    """Message content as one string (null is ""): text parts joined by newlines, where `other(path,
    type, part)` gives the text of any other part, or raises the 400 refusing it."""
    if value is None:
        return ""
    return "\n".join(
        validation.field(part, "text", "string", path=where, required=True) if kind == "text" else other(where, kind, part)
        for where, kind, part in content_parts(value, path, noun, bare_strings=bare_strings)
    )


def checked_format(fmt: dict[str, Any], param: str) -> dict[str, Any]:
    """`fmt` (a response_format in the chat API's shape, converted from a route's own spelling) if the grammar
    takes it, else the 400 naming the route's field `param`."""
    try:
        parse_response_format(fmt, param)
    except GrammarError as exc:
        raise bad_request(str(exc), exc.param) from None
    return fmt


def enable_thinking_for(state: ServerState, req: GenRequest) -> bool | None:
    return req.enable_thinking if req.enable_thinking is not None else state.settings.enable_thinking


def encode_prompt(state: ServerState, req: GenRequest, *, fit: bool = True) -> int:
    """Render (chat) and tokenize the prompt exactly as the engine will, keep the result in
    `req.encoded`, and return its length; LocalGLMError for bad input. With `fit`, a prompt whose
    length alone shows it cannot fit the context raises PromptTooLong before it is tokenized."""
    model = state.model
    if req.input_ids is not None:
        vocab = model.config.vocab_size
        if any(t < 0 or t >= vocab for t in req.input_ids):
            raise bad_request(f"{prompt_param(req)}: token ids must be in the vocabulary (0..{vocab - 1})", prompt_param(req))
        req.encoded = list(req.input_ids)
        return len(req.input_ids)
    with state.tokenize_lock:
        if req.messages is not None:
            chat = model.encode_chat(
                req.messages,
                tools=template_tools(req),
                enable_thinking=enable_thinking_for(state, req),
                clear_thinking=req.clear_thinking if req.clear_thinking is not None else state.settings.clear_thinking,
                parse_special_tokens=state.settings.parse_special_tokens,
                fit=fit,
            )
            req.encoded = chat
            return len(chat.ids)
        req.encoded = model.encode_text(req.prompt or "", fit=fit)
        return len(req.encoded)


def context_error(tokens: int, ctx: int, req: GenRequest, *, at_least: bool = False) -> APIError:
    """The context-overflow error in the words each API's clients recognise (code context_length_exceeded).

    OpenAI route: OpenAI's own sentence, "This model's maximum context length is M tokens. However, your
    messages resulted in N tokens", which litellm (ExceptionCheckers.is_error_str_context_window_exceeded
    in litellm_core_utils/exception_mapping_utils.py) maps to ContextWindowExceededError, so aider trims
    its history. Anthropic route: Anthropic's "prompt is too long: N tokens > M maximum", which agents that
    compact on overflow look for.
    """
    n = f"{'at least ' if at_least else ''}{tokens}"
    hint = "shorten the conversation or restart the server with a larger --ctx"
    if req.endpoint.startswith("/v1/messages"):
        message = f"prompt is too long: {n} tokens > {ctx} maximum ({hint})"
    else:
        what = "messages" if req.chat else "prompt"
        message = f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in {n} tokens: {hint}."
    return APIError(400, message, param=prompt_param(req), code="context_length_exceeded")


def prompt_param(req: GenRequest) -> str:
    """The request field that holds the prompt, in the route's API."""
    if req.endpoint.startswith("/v1/responses"):
        return "input"
    if req.endpoint == "/api/generate":
        return "prompt"
    return "messages" if req.chat else "prompt"


def allowed_tools(
    spec: dict[str, Any], where: str, tools: list[dict[str, Any]] | None, name_of: Callable[[dict[str, Any], str], str]
) -> tuple[str, None, list[dict[str, Any]] | None]:
    """tool_choice "allowed_tools" (both OpenAI APIs; `spec` holds its mode and tools at `where`, `name_of(item, path)`
    reads one listed tool's name in the API's spelling): (mode, None, the request's tools it lets be called)."""
    mode = validation.field(spec, "mode", "string", path=where, default="auto")
    if mode not in ("auto", "required"):
        raise bad_request(f"{where}.mode: {mode!r} is not auto or required", f"{where}.mode")
    allowed = set()
    for j, t in enumerate(validation.field(spec, "tools", "array", path=where, required=True)):
        item = join(join(where, "tools"), j)
        allowed.add(name_of(expect(t, "object", item), item))
    kept = [t for t in tools or () if t["function"]["name"] in allowed]
    if mode == "required" and not kept:
        raise bad_request(f"{where}.tools: none of these tools is in tools", f"{where}.tools")
    return mode, None, kept or None


def custom_tool(name: str, description: str | None, fmt: Any, path: str) -> tuple[dict[str, Any], InputGrammar | None]:
    """A custom (free-form) tool as the function the template shows, one string argument CUSTOM_INPUT, and its
    input grammar (`fmt`, None: free text); a bad format is the 400 naming `path`."""
    fn: dict[str, Any] = {"name": name}
    if description is not None:
        fn["description"] = description
    fn["parameters"] = {"type": "object", "properties": {CUSTOM_INPUT: {"type": "string"}}, "required": [CUSTOM_INPUT]}
    try:
        return {"type": "function", "function": fn}, parse_input_format(fmt, path)
    except GrammarError as exc:
        raise bad_request(str(exc), exc.param) from None


def custom_input(arguments: dict[str, Any]) -> str:
    """A custom tool call's text input from the arguments the model wrote for it."""
    value = arguments.get(CUSTOM_INPUT, "")
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def template_tools(req: GenRequest) -> list[dict[str, Any]] | None:
    """Tools shown to the model: none for tool_choice "none", only the named one for a named choice."""
    if not req.tools or req.tool_mode == "none":
        return None
    if req.tool_mode == "named":
        return [t for t in req.tools if t.get("function", {}).get("name") == req.tool_name] or None
    return req.tools


async def prepare(state: ServerState, req: GenRequest, *, fit: bool = True) -> None:
    """Tokenize, check the context and the sampling parameters: every input error is a 400 before queueing.

    Without `fit` (count_tokens), a prompt longer than the context is still counted."""
    try:
        state.sampling.updated(**req.sampling)
        n = await run_in_threadpool(encode_prompt, state, req, fit=fit)
    except PromptTooLong as exc:
        raise context_error(exc.tokens, exc.ctx, req, at_least=not exc.exact) from None
    except LocalGLMError as exc:
        raise bad_request(str(exc)) from None
    ctx = state.model.ctx
    if n == 0:
        raise bad_request("the prompt is empty", prompt_param(req))
    if fit and n >= ctx:
        raise context_error(n, ctx, req)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise bad_request("max_tokens must be at least 1", "max_tokens")
    req.prompt_tokens = n
    if fit:
        try:
            req.constraint = await run_in_threadpool(build_constraint, state, req)
        except GrammarError as exc:
            raise bad_request(str(exc), exc.param or ("response_format" if req.response_format else "tools")) from None
        except LocalGLMError as exc:
            raise bad_request(str(exc)) from None


def max_new_tokens(state: ServerState, req: GenRequest) -> int:
    """max_tokens, or up to the end of the context. A max_tokens beyond the context is accepted and the
    reply ends with the context (as llama-server does; `Reply.finish` says the context ended it)."""
    room = max(1, state.model.ctx - req.prompt_tokens)
    return min(req.max_tokens, room) if req.max_tokens else room


def build_constraint(state: ServerState, req: GenRequest) -> LogitsProcessor | None:
    """The request's grammar and thinking budget as one logits processor (None: nothing to enforce)."""
    chat = isinstance(req.encoded, EncodedChat)
    tools = req.tools if chat else None
    if req.response_format is None and req.thinking_budget is None and not tools:
        return None
    return state.model.constrained(
        prompt_text=req.encoded.text if isinstance(req.encoded, EncodedChat) else None,
        response_format=req.response_format,
        thinking_budget=req.thinking_budget,
        max_new_tokens=max_new_tokens(state, req),
        tools=tools,
        tool_mode=req.tool_mode,
        tool_name=req.tool_name,
        single_tool_call=req.single_tool_call,
        tool_grammar=state.settings.tool_grammar,
        tool_formats=req.tool_formats,
    )


def admit(state: ServerState) -> Admission:
    """A place in the engine's queue, or the 503 the clients retry later."""
    try:
        return state.worker.admit()
    except QueueFull as exc:
        state.metrics.count_rejected()
        raise APIError(
            503,
            f"the server is busy: {state.worker.max_waiting} requests are already waiting (--queue-size); retry later",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except ShuttingDown:
        raise shutting_down() from None


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="server_shutting_down", headers={"Retry-After": "5"})


def generate_kwargs(state: ServerState, req: GenRequest) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens(state, req),
        sampling=state.sampling,
        reuse_prefix=state.settings.reuse_prefix,
        **{k: v for k, v in req.sampling.items() if v is not None},
    )
    if isinstance(req.encoded, EncodedChat):
        # the server builds the tool grammar itself (`build_constraint`: it knows tool_choice)
        kwargs.update(chat=req.encoded, tools=template_tools(req), stop=[*req.stop, *ROLE_STOP_STRINGS], tool_grammar=False)
    else:
        assert req.encoded is not None, "prepare() first"
        kwargs.update(input_ids=req.encoded, stop=list(req.stop))
    # The test hook's processor runs after the grammar: a scripted (forced) output wins over it.
    processor = chain(req.constraint, state.hook(req.endpoint, req.raw) if state.hook is not None else None)
    if processor is not None:
        kwargs["logits_processor"] = processor
    return kwargs


async def start_job(state: ServerState, req: GenRequest) -> tuple[Job, Reply]:
    """Validate against the model and queue the generation (400 / 503 raised here, before any response).

    Returns the job and the `Reply` that will filter and collect its events.
    """
    state.worker.start()
    with admit(state) as admission:
        await prepare(state, req)
        try:
            job = admission.submit(req.endpoint, generate_kwargs(state, req), asyncio.get_running_loop())
        except ShuttingDown:
            raise shutting_down() from None
    return job, Reply(state, req)


def job_error(err: JobError) -> APIError:
    return APIError(err.status, err.message, code=err.code)


@dataclass
class Finish:
    reason: str  # stop | length | tool_calls | stop_sequence
    stop_sequence: str | None = None
    context: bool = False  # "length" because the context is full (not max_tokens)


class Reply:
    """Filters the engine's events for one request and accumulates the whole reply."""

    def __init__(self, state: ServerState, req: GenRequest) -> None:
        self.state = state
        self.req = req
        self.thinking: list[str] = []
        self.content: list[str] = []
        self.calls: list[ToolCall] = []
        self.started_calls: set[int] = set()
        self.done: Done | None = None

    def _call_allowed(self, index: int) -> bool:
        if self.req.tool_mode == "none":
            return False
        return not (self.req.single_tool_call and index > 0)

    def accept(self, event: Any) -> bool:
        """Record `event`; False when it must not reach the client."""
        if isinstance(event, ThinkingDelta):
            self.thinking.append(event.text)
        elif isinstance(event, ContentDelta):
            self.content.append(event.text)
        elif isinstance(event, (ToolCallStart, ToolCallArgsDelta, ToolCallEnd)):
            if not self._call_allowed(event.index):
                return False
            if isinstance(event, ToolCallStart):
                self.started_calls.add(event.index)
            elif isinstance(event, ToolCallEnd):
                self.calls.append(event.call)
        elif isinstance(event, Done):
            self.done = event
        return True

    @property
    def thinking_text(self) -> str:
        return "".join(self.thinking)

    @property
    def content_text(self) -> str:
        return "".join(self.content)

    def finish(self) -> Finish:
        done = self.done
        assert done is not None
        if done.finish_reason == "length":
            s = done.stats
            return Finish("length", context=s is not None and s.prompt_tokens + s.decode_tokens >= self.state.model.ctx)
        if done.finish_reason == "stop_string":
            matched = self._matched_stop(done)
            if matched is not None:
                return Finish("stop_sequence", matched)
        return Finish("tool_calls" if self.calls else "stop")

    def _matched_stop(self, done: Done) -> str | None:
        """Which of the client's stop strings cut the text (None: one of GLM's role tags did)."""
        stops = [s for s in self.req.stop if s]
        tokenizer = self.state.model.tokenizer
        if not stops or tokenizer is None:
            return None
        rest = tokenizer.decode(done.token_ids)[len(done.text) :]
        hits = [(rest.find(s), -len(s), s) for s in [*stops, *ROLE_STOP_STRINGS] if rest.find(s) >= 0]
        if not hits:
            return None
        best = min(hits)[2]
        return best if best in stops else None

    def usage_numbers(self) -> tuple[int, int, int]:
        """(prompt tokens, cached prompt tokens, completion tokens)."""
        s = self.done.stats if self.done is not None else None
        if s is None:
            return self.req.prompt_tokens, 0, 0
        return s.prompt_tokens, s.cached_prompt_tokens, s.decode_tokens

    def timings(self) -> dict[str, Any]:
        """llama-server style timings (an extra field the official clients keep as-is)."""
        s = self.done.stats if self.done is not None else None
        if s is None:
            return {}
        return {
            "prompt_n": s.prompt_tokens,
            "cache_n": s.cached_prompt_tokens,
            "prompt_ms": round(s.prompt_s * 1000, 3),
            "prompt_per_second": round(s.prompt_tok_s, 3),
            "predicted_n": s.decode_tokens,
            "predicted_ms": round(s.decode_s * 1000, 3),
            "predicted_per_second": round(s.decode_tok_s, 3),
            "ttft_ms": round(s.ttft_s * 1000, 3),
        }


async def collect(job: Job, reply: Reply) -> Reply:
    """Run a job to its end (non-streaming responses); a failed job raises APIError."""
    async for item in job.items():
        if isinstance(item, JobError):
            raise job_error(item)
        reply.accept(item)
    return reply


async def json_reply(
    request: Request, state: ServerState, job: Job, reply: Reply, build: Callable[[], dict[str, Any]]
) -> Response:
    """A non-streaming response: run the job to its end, then send `build()` as JSON.

    A client that disconnects first cancels the job and gets a 499 (nobody reads it).
    """
    done = await until_disconnect(request.receive, lambda: collect(job, reply), lambda: state.worker.cancel(job))
    if done is None:
        return Response(status_code=499)
    return JSONResponse(build())


async def stream_job(
    state: ServerState,
    job: Job,
    reply: Reply,
    render: Callable[[Any], Iterable[str]],
    *,
    ping: str,
    error: Callable[[APIError], str],
    first: Iterable[str] = (),
    last: str | None = None,
) -> AsyncIterator[str]:
    """A streaming response's text: `first`, then `render(event)` for each event `reply` lets through
    (ending with `Done`), `ping` on each heartbeat, `error(...)` in place of the rest when the job
    fails, and `last` at the end either way. Closed before the job is over (the client went away),
    it cancels the job."""
    ended = False
    try:
        for text in first:
            yield text
        async for item in job.items(state.settings.heartbeat_s):
            if item is HEARTBEAT:
                yield ping
                continue
            if isinstance(item, JobError):
                ended = True
                yield error(job_error(item))
                break
            if not reply.accept(item):
                continue
            if isinstance(item, Done):
                ended = True
            for text in render(item):
                yield text
        if last is not None:
            yield last
    finally:
        if not ended:
            state.worker.cancel(job)
