"""Reading an OpenAI Responses API request (POST /v1/responses) into the shared `GenRequest`.

The Responses API sends a conversation as a flat list of items: messages (`input_text` parts),
the model's earlier `reasoning`, `function_call` and `custom_tool_call` items, and the client's
`function_call_output` / `custom_tool_call_output` items. GLM's chat template reads one assistant
message per turn (its reasoning, text and tool calls together), so consecutive assistant items are
folded into one message, and each output item becomes a `tool` message. Tools are flat (`{type:
"function", name, parameters}`); `custom` tools (free-form text input, as Codex's apply_patch can
be) are shown to the model as a function with one string argument, `input`, held to the tool's
`format` grammar (Lark or regex) when it has one. Hosted tools (web
search, file search, code interpreter, ...) cannot run here and are left out of the prompt, as the
Anthropic route leaves Anthropic's hosted tools out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field as dataclass_field
from typing import Any

from ..grammar import CUSTOM_INPUT, InputGrammar
from ..grammar.budget import EFFORT_BUDGETS
from .chat import IMAGE_PLACEHOLDER, GenRequest, allowed_tools, checked_format, content_text, custom_tool
from .errors import bad_request
from .validation import call_arguments, describe, expect, field, join, tool_schema

ENDPOINT = "/v1/responses"
HOSTED_TOOLS = frozenset({
    "web_search", "web_search_preview", "web_search_preview_2025_03_11", "web_search_2025_08_26", "file_search",
    "computer", "computer_use_preview", "code_interpreter", "image_generation", "mcp", "local_shell", "shell",
    "apply_patch", "tool_search", "namespace",
})  # fmt: skip
EFFORTS = ("none", *EFFORT_BUDGETS, "xhigh")  # xhigh: no bound, as high
TEXT_PARTS = ("input_text", "output_text", "text")
NOT_TEXT_PARTS = ("input_image", "input_file", "input_audio")


@dataclass
class ResponsesRequest:
    """A parsed request: the generation, and what the response object echoes back."""

    gen: GenRequest
    stream: bool
    store: bool
    history: list[dict[str, Any]]  # the conversation without `instructions` (what a later previous_response_id continues)
    echo: dict[str, Any] = dataclass_field(default_factory=dict)  # request fields the response object repeats


def _part_text(where: str, kind: str, part: Any, images_ok: bool) -> str:
    if kind == "refusal":
        return field(part, "refusal", "string", path=where, default="")
    if kind in NOT_TEXT_PARTS and images_ok:
        return IMAGE_PLACEHOLDER
    if kind in NOT_TEXT_PARTS:
        raise bad_request(f"{where}.type: {kind!r} parts are not supported: this model reads text only", f"{where}.type")
    raise bad_request(f"{where}.type: {kind!r} is not a content part this server accepts (input_text, output_text)", f"{where}.type")


def _text(value: Any, path: str, *, images_ok: bool = False) -> str:
    """Content as one string: a string, or an array of text parts (input_text / output_text). With
    `images_ok` (a tool's output, such as Codex's view_image), an image or file part becomes a note."""

    def other(where: str, kind: str, part: Any) -> str:
        if kind in TEXT_PARTS:
            return field(part, "text", "string", path=where, required=True)
        return _part_text(where, kind, part, images_ok)

    return content_text(value, path, "content parts", other)


class _Conversation:
    """Input items -> GLM chat messages; the assistant items of one turn become one message."""

    def __init__(self, start: list[dict[str, Any]]) -> None:
        self.messages = [dict(m) for m in start]
        self.turn: dict[str, Any] | None = None  # the assistant message being assembled

    def assistant(self) -> dict[str, Any]:
        if self.turn is None:
            self.turn = {"role": "assistant", "content": ""}
            self.messages.append(self.turn)
        return self.turn

    def add(self, message: dict[str, Any]) -> None:
        self.turn = None
        self.messages.append(message)

    def item(self, item: Any, path: str, custom: set[str]) -> None:
        if isinstance(item, str):  # the SDKs type input items strictly; a bare string is a user message, leniently
            self.add({"role": "user", "content": item})
            return
        expect(item, "object", path)
        kind = field(item, "type", "string", path=path, default="message")
        if kind == "message":
            self.message(item, path)
        elif kind == "reasoning":
            raw, summary = (self.reasoning_texts(item, path, key) for key in ("content", "summary"))
            text = "\n".join(raw or summary)  # the reasoning itself where the client sent it back, else its summary
            turn = self.assistant()
            if text:
                turn["reasoning_content"] = "\n".join(filter(None, [turn.get("reasoning_content"), text]))
        elif kind in ("function_call", "custom_tool_call"):
            name = field(item, "name", "string", path=path, required=True)
            call_id = field(item, "call_id", "string", path=path, required=True)
            if kind == "function_call":
                args = call_arguments(item.get("arguments"), join(path, "arguments"))
            else:
                args = {CUSTOM_INPUT: field(item, "input", "string", path=path, default="")}
                custom.add(name)
            self.assistant().setdefault("tool_calls", []).append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = field(item, "call_id", "string", path=path, required=True)
            if item.get("output") is None:
                raise bad_request(f"{path}.output: this field is required", f"{path}.output")
            self.add({"role": "tool", "content": _text(item["output"], join(path, "output"), images_ok=True), "tool_call_id": call_id})
        elif kind == "item_reference":
            raise bad_request(f"{path}: item references are not supported; send the item itself, or previous_response_id", f"{path}.type")
        else:
            raise bad_request(f"{path}.type: {kind!r} items are not supported by this server (messages, reasoning, "
                              "function and custom tool calls and their outputs are)", f"{path}.type")  # fmt: skip

    @staticmethod
    def reasoning_texts(item: dict[str, Any], path: str, key: str) -> list[str]:
        """The non-empty texts of a reasoning item's `content` (reasoning_text) or `summary` (summary_text) parts."""
        out = []
        for j, part in enumerate(field(item, key, "array", path=path, default=[])):
            where = join(join(path, key), j)
            expect(part, "object", where)
            text = field(part, "text", "string", path=where, default="")
            if text:
                out.append(text)
        return out

    def message(self, item: dict[str, Any], path: str) -> None:
        role = field(item, "role", "string", path=path, required=True)
        if "content" not in item:
            raise bad_request(f"{path}.content: this field is required", f"{path}.content")
        text = _text(item["content"], join(path, "content"))
        if role == "assistant":  # several message items of one turn (commentary, then the answer) read as paragraphs
            turn = self.assistant()
            turn["content"] = "\n\n".join(filter(None, [turn["content"], text]))
        elif role in ("user", "system", "developer"):
            self.add({"role": "system" if role == "developer" else role, "content": text})
        else:
            raise bad_request(f"{path}.role: {role!r} is not one of user, assistant, system, developer", f"{path}.role")


def parse_input(body: dict[str, Any], prior: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], set[str]]:
    """`input` (a string, or an array of items) after the `prior` conversation: (messages, custom tools called)."""
    value = body.get("input")
    if value is None:
        raise bad_request("input: this field is required", "input")
    conv = _Conversation(prior)
    custom: set[str] = set()
    if isinstance(value, str):
        conv.add({"role": "user", "content": value})
    elif isinstance(value, list):
        for i, item in enumerate(value):
            conv.item(item, f"input[{i}]", custom)
    else:
        raise bad_request(f"input: expected a string or an array of items, got {describe(value)}", "input")
    if len(conv.messages) == len(prior):
        raise bad_request("input: must hold at least one item", "input")
    return conv.messages, custom


@dataclass(frozen=True)
class Tools:
    """A request's tools as the template and the grammar take them."""

    functions: list[dict[str, Any]] | None  # OpenAI function form (what the template renders)
    custom: frozenset[str]  # the custom tools' names (their calls come back as custom_tool_call items)
    formats: dict[str, InputGrammar]  # the custom tools' input grammars, by name


def parse_tools(body: dict[str, Any]) -> Tools:
    """Flat Responses tools -> OpenAI function tools, the custom tools' names and their input grammars."""
    tools = field(body, "tools", "array")
    out: list[dict[str, Any]] = []
    custom: set[str] = set()
    formats: dict[str, InputGrammar] = {}
    for i, tool in enumerate(tools or ()):
        path = f"tools[{i}]"
        expect(tool, "object", path)
        kind = field(tool, "type", "string", path=path, required=True)
        if kind in HOSTED_TOOLS:
            continue  # run by OpenAI's servers, not by a model on this machine
        if kind not in ("function", "custom"):
            raise bad_request(f"{path}.type: {kind!r} tools are not supported (function and custom tools are)", f"{path}.type")
        name = field(tool, "name", "string", path=path, required=True)
        if not name:
            raise bad_request(f"{path}.name: must not be empty", f"{path}.name")
        description = field(tool, "description", "string", path=path)
        if kind == "custom":
            shown, grammar = custom_tool(name, description, tool.get("format"), f"{path}.format")
            custom.add(name)
            if grammar is not None:
                formats[name] = grammar
            out.append(shown)
            continue
        fn: dict[str, Any] = {"name": name}
        if description is not None:
            fn["description"] = description
        fn["parameters"] = tool_schema(tool, "parameters", path, default={"type": "object", "properties": {}})
        out.append({"type": "function", "function": fn})
    return Tools(out or None, frozenset(custom), formats)


def parse_tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> tuple[str, str | None, list[dict[str, Any]] | None]:
    """(mode, named tool, the tools it leaves): "auto" | "none" | "required" | {type: function | custom,
    name} | {type: "allowed_tools", mode, tools}."""
    choice = body.get("tool_choice")
    names = [t["function"]["name"] for t in tools or ()]
    if choice is None:
        return "auto", None, tools
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"tool_choice: {choice!r} is not one of none, auto, required", "tool_choice")
        if choice == "required" and not tools:
            raise bad_request("tool_choice: 'required' needs tools, and none were given", "tool_choice")
        return choice, None, tools
    expect(choice, "object", "tool_choice")
    kind = field(choice, "type", "string", path="tool_choice", required=True)
    if kind in ("function", "custom"):
        name = field(choice, "name", "string", path="tool_choice", required=True)
        if name not in names:
            raise bad_request(f"tool_choice.name: no tool named {name!r} in tools", "tool_choice.name")
        return "named", name, tools
    if kind == "allowed_tools":  # {type, mode, tools: [{type, name}]}
        return allowed_tools(choice, "tool_choice", tools, lambda t, path: field(t, "name", "string", path=path))
    raise bad_request(f"tool_choice.type: {kind!r} is not one of function, custom, allowed_tools "
                      "(hosted tools do not run on this server)", "tool_choice.type")  # fmt: skip


def parse_reasoning(body: dict[str, Any]) -> tuple[bool | None, int | None]:
    """`reasoning.effort` -> (thinking on / off / the server's default, thinking budget)."""
    reasoning = field(body, "reasoning", "object")
    if not reasoning:
        return None, None
    field(reasoning, "summary", "string", path="reasoning")
    effort = field(reasoning, "effort", "string", path="reasoning")
    if effort is None:
        return None, None
    if effort not in EFFORTS:
        raise bad_request(f"reasoning.effort: {effort!r} is not one of {', '.join(EFFORTS)}", "reasoning.effort")
    if effort == "none":
        return False, None
    return True, EFFORT_BUDGETS.get(effort)


def parse_text_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """`text.format` (text, json_object, or json_schema with its schema at the top level) in chat's
    `response_format` shape; None for plain text."""
    text = field(body, "text", "object")
    fmt = field(text, "format", "object", path="text") if text else None
    if fmt is None:
        return None
    kind = field(fmt, "type", "string", path="text.format", required=True)
    if kind == "text":
        return None
    if kind == "json_object":
        converted: dict[str, Any] = {"type": "json_object"}
    elif kind == "json_schema":
        schema = field(fmt, "schema", "object", path="text.format", required=True)
        spec = {"name": field(fmt, "name", "string", path="text.format", default="response"), "schema": schema}
        strict = field(fmt, "strict", "boolean", path="text.format")
        if strict is not None:
            spec["strict"] = strict
        converted = {"type": "json_schema", "json_schema": spec}
    else:
        raise bad_request(f"text.format.type: {kind!r} is not one of text, json_object, json_schema", "text.format.type")
    return checked_format(converted, "text.format")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if field(body, "background", "boolean", default=False):
        raise bad_request("background: background responses are not supported; stream instead", "background")
    if body.get("conversation") is not None:
        raise bad_request("conversation: stored conversations are not supported; use previous_response_id or send the items", "conversation")
    if body.get("prompt") is not None:
        raise bad_request("prompt: stored prompt templates are not supported", "prompt")
    if field(body, "top_logprobs", "integer", default=0):
        raise bad_request("top_logprobs: not supported by this server", "top_logprobs")
    for i, name in enumerate(field(body, "include", "array", default=[])):
        expect(name, "string", f"include[{i}]")


def parse_request(body: dict[str, Any], prior: list[dict[str, Any]] | None, *, for_count: bool = False) -> ResponsesRequest:
    """The whole request; `prior`: the stored conversation `previous_response_id` names (None: none)."""
    _refuse_unsupported(body)
    field(body, "model", "string")
    instructions = field(body, "instructions", "string")
    history, called_custom = parse_input(body, prior or [])
    start = [{"role": "system", "content": instructions}] if instructions else []
    gen = GenRequest(endpoint=ENDPOINT + ("/input_tokens" if for_count else ""), raw=body, messages=start + history)
    tools = parse_tools(body)
    gen.tool_mode, gen.tool_name, gen.tools = parse_tool_choice(body, tools.functions)
    gen.tool_formats = tools.formats
    gen.custom_tools = tools.custom | frozenset(called_custom)  # their calls come back as custom_tool_call items
    gen.single_tool_call = field(body, "parallel_tool_calls", "boolean", default=True) is False
    gen.enable_thinking, gen.thinking_budget = parse_reasoning(body)
    gen.response_format = parse_text_format(body)
    gen.max_tokens = field(body, "max_output_tokens", "integer", minimum=1)
    gen.sampling = {
        "temperature": field(body, "temperature", "number", minimum=0, maximum=2),
        "top_p": field(body, "top_p", "number", above=0, maximum=1),
    }
    metadata = field(body, "metadata", "object", default={})
    echo = {
        "instructions": instructions,
        "metadata": metadata,
        "tools": field(body, "tools", "array", default=[]),
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": not gen.single_tool_call,
        "temperature": gen.sampling["temperature"],
        "top_p": gen.sampling["top_p"],
        "max_output_tokens": gen.max_tokens,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": field(body, "reasoning", "object", default={}) or None,
        "text": {"format": (field(body, "text", "object") or {}).get("format") or {"type": "text"}},
        "truncation": field(body, "truncation", "string", default="disabled"),
        "user": field(body, "user", "string"),
    }
    return ResponsesRequest(
        gen=gen,
        stream=field(body, "stream", "boolean", default=False),
        store=field(body, "store", "boolean", default=True),
        history=history,
        echo=echo,
    )

