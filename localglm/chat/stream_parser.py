"""Streaming parser for GLM assistant output: thinking, content and XML-style tool calls.

GLM writes `<think>…</think>`, then content, then tool calls as
`<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call>` (GLM-4.5/4.6 put a
newline after the name and after each key/value; GLM-4.7/5.x do not). Text arrives in arbitrary
pieces, so a tag may be cut anywhere (`<th`, `</arg_v`): we hold back only a possible tag prefix
and release it as soon as it cannot be one. The result is the same however the stream is split.

Tool-call arguments are streamed as JSON text: the `ToolCallArgsDelta`s of one call concatenate to
`json.dumps(arguments)`. Values are typed by the tool's JSON schema: string parameters keep the raw
text (newlines verbatim), others are parsed as JSON, falling back to the raw string.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"
# Role/end tokens: the assistant turn is over; nothing after them is part of the reply.
STOP_TAGS = ("<|user|>", "<|observation|>", "<|endoftext|>", "<|system|>", "<|assistant|>")


@dataclass(frozen=True)
class ToolCall:
    """A finished tool call. `truncated` is set when the stream ended inside it (e.g. max tokens)."""

    id: str
    name: str
    arguments: dict[str, Any]
    truncated: bool = False

    @property
    def arguments_json(self) -> str:
        """Arguments as JSON text (the OpenAI `function.arguments` field)."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ThinkingDelta:
    """More reasoning text."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """More visible reply text."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call began; its name is known."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    """More of the call's arguments as JSON text."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    """The call is complete; `call.arguments` is final."""

    index: int
    call: ToolCall


Event = ThinkingDelta | ContentDelta | ToolCallStart | ToolCallArgsDelta | ToolCallEnd


@dataclass
class ParsedMessage:
    """A whole assistant reply, split into its parts."""

    thinking: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> ParsedMessage:
        """Accumulate a stream of parser events."""
        msg = cls()
        for event in events:
            if isinstance(event, ThinkingDelta):
                msg.thinking += event.text
            elif isinstance(event, ContentDelta):
                msg.content += event.text
            elif isinstance(event, ToolCallEnd):
                msg.tool_calls.append(event.call)
        return msg


class _State(Enum):
    CONTENT = auto()
    THINKING = auto()
    CALL_NAME = auto()  # after <tool_call>, reading the function name
    CALL_BODY = auto()  # between arguments
    ARG_KEY = auto()
    ARG_VALUE = auto()


_TAGS: dict[_State, tuple[str, ...]] = {
    _State.CONTENT: (THINK_OPEN, THINK_CLOSE, CALL_OPEN, *STOP_TAGS),
    _State.THINKING: (THINK_OPEN, THINK_CLOSE, *STOP_TAGS),
    _State.CALL_NAME: (KEY_OPEN, VALUE_OPEN, CALL_CLOSE, *STOP_TAGS),
    _State.CALL_BODY: (KEY_OPEN, VALUE_OPEN, CALL_CLOSE, *STOP_TAGS),
    _State.ARG_KEY: (KEY_CLOSE, *STOP_TAGS),
    _State.ARG_VALUE: (VALUE_CLOSE, *STOP_TAGS),
}
_LONGEST_TAG = max(len(t) for tags in _TAGS.values() for t in tags)


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _reject_constant(name: str) -> Any:
    raise ValueError(name)  # NaN/Infinity are not JSON; keep such values as strings


def _parse_json_value(raw: str) -> Any:
    """`raw` as JSON if it is valid (strict) JSON, else the raw string."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return raw


def is_string_schema(schema: Any) -> bool:
    """True when a parameter schema only admits strings (and maybe null)."""
    if not isinstance(schema, Mapping):
        return False
    kind = schema.get("type")
    if isinstance(kind, str):
        return kind == "string"
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return bool(kinds) and all(k == "string" for k in kinds)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return all(isinstance(v, str) for v in schema["enum"])
    for combo in ("anyOf", "oneOf"):
        options = schema.get(combo)
        if isinstance(options, list) and options:
            real = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
            return bool(real) and all(is_string_schema(o) for o in real)
    return False


def tool_parameter_schemas(tools: Iterable[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Map tool name -> {parameter name -> JSON schema}, from OpenAI-style or bare function schemas."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or ():
        if not isinstance(tool, Mapping):
            continue
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters") or {}
        props = params.get("properties") if isinstance(params, Mapping) else None
        out[fn["name"]] = dict(props) if isinstance(props, Mapping) else {}
    return out


class _TextChannel:
    """Content or thinking text: drops leading whitespace, holds trailing whitespace until more text.

    The templates strip both when re-rendering a turn, and GLM-4.5 puts a newline around each part.
    """

    def __init__(self) -> None:
        self._started = False
        self._pending_ws = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._pending_ws + text
        kept = text.rstrip()
        self._pending_ws = text[len(kept) :]
        return kept


@dataclass
class _OpenCall:
    """A tool call being parsed."""

    index: int
    id: str
    name_buf: str = ""
    name: str | None = None  # set once the name is complete
    arguments: dict[str, Any] = field(default_factory=dict)
    key_buf: str = ""
    pending_key: str | None = None  # key read, value not yet closed
    value_parts: list[str] = field(default_factory=list)
    value_is_string: bool = False
    wrote_key: bool = False


class ChatStreamParser:
    """Turns GLM output text, fed in arbitrary pieces, into thinking/content/tool-call events."""

    def __init__(
        self,
        start_in_thinking: bool = False,
        tools: list[dict] | None = None,
        *,
        new_call_id: Callable[[], str] = _new_call_id,
    ) -> None:
        """`start_in_thinking`: the prompt already opened `<think>` (GLM-4.7 with thinking on)."""
        self._state = _State.THINKING if start_in_thinking else _State.CONTENT
        self._schemas = tool_parameter_schemas(tools)
        self._new_call_id = new_call_id
        self._buf = ""
        self._content = _TextChannel()
        self._thinking = _TextChannel()
        self._call: _OpenCall | None = None
        self._call_count = 0
        self._events: list[Event] = []
        self._stopped = False
        self._finished = False

    @classmethod
    def for_prompt(cls, prompt: str, tools: list[dict] | None = None) -> ChatStreamParser:
        """A parser for the reply to `prompt`: starts in thinking when the prompt ends with `<think>`."""
        return cls(start_in_thinking=prompt.rstrip().endswith(THINK_OPEN), tools=tools)

    @property
    def stopped(self) -> bool:
        """True once a role/end token (`<|user|>`, `<|observation|>`, ...) ended the reply."""
        return self._stopped

    def feed(self, text: str) -> list[Event]:
        """Consume more generated text; returns the events it completes."""
        if self._finished:
            raise RuntimeError("ChatStreamParser.feed() called after finish()")
        if not self._stopped:
            self._buf += text
            self._scan(final=False)
        return self._take_events()

    def finish(self) -> list[Event]:
        """End of stream: release held-back text and close an unterminated tool call."""
        if self._finished:
            return []
        self._finished = True
        if not self._stopped:
            self._scan(final=True)
        self._buf = ""
        self._close_open_call(at_end=True)
        return self._take_events()

    # ---- scanning ------------------------------------------------------------------------------

    def _scan(self, final: bool) -> None:
        """Process the buffer, stopping at a possible partial tag unless `final`."""
        buf, i = self._buf, 0
        while i < len(buf) and not self._stopped:
            lt = buf.find("<", i)
            if lt != i:
                end = len(buf) if lt < 0 else lt
                self._on_text(buf[i:end])
                i = end
                continue
            tags = _TAGS[self._state]
            tag = next((t for t in tags if buf.startswith(t, i)), None)
            if tag is not None:
                i += len(tag)
                self._on_tag(tag)
            elif not final and len(buf) - i < _LONGEST_TAG and any(t.startswith(buf[i:]) for t in tags):
                break  # could still become a tag: wait for more text
            else:
                self._on_text("<")
                i += 1
        self._buf = buf[i:]

    def _on_text(self, text: str) -> None:
        state = self._state
        if state is _State.CONTENT:
            if out := self._content.push(text):
                self._emit(ContentDelta(out))
        elif state is _State.THINKING:
            if out := self._thinking.push(text):
                self._emit(ThinkingDelta(out))
        elif state is _State.CALL_NAME:
            self._read_name(text)
        elif state is _State.ARG_KEY:
            self._call.key_buf += text
        elif state is _State.ARG_VALUE:
            self._call.value_parts.append(text)
            if self._call.value_is_string:
                self._emit(ToolCallArgsDelta(self._call.index, json.dumps(text, ensure_ascii=False)[1:-1]))
        # CALL_BODY: whitespace (or junk) between arguments is not part of anything.

    def _on_tag(self, tag: str) -> None:
        state = self._state
        if tag in STOP_TAGS:
            self._stopped = True
        elif tag == THINK_OPEN:
            self._state = _State.THINKING  # a repeated <think> inside thinking is swallowed
        elif tag == THINK_CLOSE:
            self._state = _State.CONTENT  # a stray </think> in content is swallowed
        elif tag == CALL_OPEN:
            self._call = _OpenCall(index=self._call_count, id=self._new_call_id())
            self._state = _State.CALL_NAME
        elif tag == KEY_OPEN:
            self._end_name()
            self._close_valueless_key()
            self._state = _State.ARG_KEY
        elif tag == KEY_CLOSE:
            self._write_key(self._call.key_buf.strip())
            self._call.key_buf = ""
            self._state = _State.CALL_BODY
        elif tag == VALUE_OPEN:
            self._end_name()
            self._open_value()
            self._state = _State.ARG_VALUE
        elif tag == VALUE_CLOSE:
            self._close_value()
            self._state = _State.CALL_BODY
        elif tag == CALL_CLOSE:
            if state is _State.CALL_NAME:
                self._end_name()
            self._close_open_call(at_end=False)
            self._state = _State.CONTENT

    # ---- tool calls ----------------------------------------------------------------------------

    def _read_name(self, text: str) -> None:
        """Accumulate the function name; GLM-4.5 ends it with a newline, GLM-4.7 with the next tag."""
        call = self._call
        call.name_buf += text
        head = call.name_buf.lstrip()
        if "\n" in head:
            call.name_buf = head[: head.index("\n")]
            self._end_name()
            self._state = _State.CALL_BODY

    def _end_name(self) -> None:
        call = self._call
        if call.name is None:
            call.name = call.name_buf.strip()
            if call.name:
                self._emit(ToolCallStart(call.index, call.id, call.name))
                self._call_count += 1

    def _is_string_param(self, key: str) -> bool:
        schema = self._schemas.get(self._call.name or "", {}).get(key)
        return is_string_schema(schema)

    def _write_key(self, key: str) -> None:
        call = self._call
        self._close_valueless_key()
        prefix = ", " if call.wrote_key else "{"
        call.wrote_key = True
        call.pending_key = key
        self._args_delta(prefix + json.dumps(key, ensure_ascii=False) + ": ")

    def _close_valueless_key(self) -> None:
        """A key followed by another key or the end of the call gets an empty string value."""
        call = self._call
        if call.pending_key is not None:
            call.arguments[call.pending_key] = ""
            call.pending_key = None
            self._args_delta('""')

    def _open_value(self) -> None:
        call = self._call
        call.value_parts = []
        call.value_is_string = call.pending_key is not None and self._is_string_param(call.pending_key)
        if call.value_is_string:
            self._args_delta('"')

    def _close_value(self) -> None:
        call = self._call
        raw = "".join(call.value_parts)
        call.value_parts = []
        if call.pending_key is None:
            return  # a value without a key carries no argument name: dropped
        if call.value_is_string:
            value: Any = raw
            self._args_delta('"')
        else:
            value = _parse_json_value(raw)
            self._args_delta(json.dumps(value, ensure_ascii=False))
        call.arguments[call.pending_key] = value
        call.pending_key = None
        call.value_is_string = False

    def _close_open_call(self, at_end: bool) -> None:
        """Finish the open call: at `</tool_call>`, or at the end of the stream with what arrived.

        At the end, a call cut inside an argument (or inside its name, without a stop token saying
        the model meant to end there) is still reported, marked `truncated`.
        """
        call = self._call
        if call is None:
            return
        state = self._state
        truncated = at_end and (
            state in (_State.ARG_KEY, _State.ARG_VALUE)
            or call.pending_key is not None
            or (state is _State.CALL_NAME and not self._stopped)
        )
        if at_end and state is _State.CALL_NAME:
            self._end_name()
        elif at_end and state is _State.ARG_VALUE:
            self._close_value()
        if call.name:  # a call without a name is nothing a client could run: dropped
            self._close_valueless_key()
            self._args_delta("}" if call.wrote_key else "{}")
            done = ToolCall(id=call.id, name=call.name, arguments=dict(call.arguments), truncated=truncated)
            self._emit(ToolCallEnd(call.index, done))
        self._call = None

    def _args_delta(self, text: str) -> None:
        call = self._call
        if call is not None and call.name:
            self._emit(ToolCallArgsDelta(call.index, text))

    # ---- events --------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _take_events(self) -> list[Event]:
        """Pending events, with adjacent text deltas of the same kind merged."""
        merged: list[Event] = []
        for event in self._events:
            prev = merged[-1] if merged else None
            if isinstance(event, (ThinkingDelta, ContentDelta)) and type(prev) is type(event):
                merged[-1] = type(event)(prev.text + event.text)
            elif (
                isinstance(event, ToolCallArgsDelta)
                and isinstance(prev, ToolCallArgsDelta)
                and prev.index == event.index
            ):
                merged[-1] = ToolCallArgsDelta(event.index, prev.text + event.text)
            else:
                merged.append(event)
        self._events = []
        return merged


def parse_complete(text: str, start_in_thinking: bool = False, tools: list[dict] | None = None) -> ParsedMessage:
    """Parse a whole reply at once (non-streaming responses)."""
    parser = ChatStreamParser(start_in_thinking=start_in_thinking, tools=tools)
    return ParsedMessage.from_events([*parser.feed(text), *parser.finish()])
