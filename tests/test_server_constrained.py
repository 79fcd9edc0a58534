"""`localglm serve` with constraints: response_format, tool_choice on both APIs, --no-tool-grammar,
context overflow in the clients' words, max_tokens past the context, thinking budgets.

The tiny random model writes the replies (temperature 1): only the grammar makes them valid. A request
containing `PUSH:<name>` gets a soft push toward that text (server/testing.Push), a model that wants to
write it, which the grammar may refuse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

import localglm
from localglm.grammar.budget import EFFORT_BUDGETS
from localglm.server import ServerSettings, create_app
from localglm.server.testing import Push, ServerThread

pytestmark = pytest.mark.usefixtures("one_thread")

TOOLS = [
    {"type": "function", "function": {"name": "bash", "description": "Run a command", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer", "minimum": 1, "maximum": 600}},
        "required": ["command"]}}},
    {"type": "function", "function": {"name": "todo", "description": "Plan", "parameters": {
        "type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
            "text": {"type": "string", "maxLength": 8}, "status": {"type": "string", "enum": ["pending", "done"]}},
            "required": ["text", "status"], "additionalProperties": False}}}, "required": ["items"]}}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
PUSHES = {
    "noval": "<tool_call>bash\n<arg_key>command</arg_key>\nls</arg_value>\n</tool_call>",  # missing <arg_value>
    "nokey": "<tool_call>bash\ncommand</arg_key>\n<arg_value>ls</arg_value>\n</tool_call>",  # missing <arg_key>
    "good": "<tool_call>bash\n<arg_key>command</arg_key>\n<arg_value>ls -la</arg_value>\n</tool_call>",
    "think": "a" * 200,
    "calc": "<tool_call>calc\n<arg_key>input</arg_key>\n<arg_value>multiply 12345</arg_value>\n</tool_call>",  # breaks the regex
}
# litellm's ExceptionCheckers.is_error_str_context_window_exceeded (litellm/litellm_core_utils/
# exception_mapping_utils.py): one of these in the lowercased message makes ContextWindowExceededError.
LITELLM_CONTEXT_SUBSTRINGS = (
    "exceed context limit",
    "this model's maximum context length is",
    "string too long. expected a string with maximum length",
    "model's maximum context limit",
    "is longer than the model's context length",
    "input tokens exceed the configured limit",
    "`inputs` tokens + `max_new_tokens` must be",
    "exceeds the available context size",
    "exceeds the maximum number of tokens allowed",
)


class PushHook:
    def __init__(self, model: localglm.Model) -> None:
        self.model = model

    def __call__(self, endpoint: str, body: dict[str, Any]) -> Any:
        names = re.findall(r"PUSH:(\w+)", json.dumps([body.get(k) for k in ("messages", "prompt", "input")]))
        if not names:
            return None
        tok = self.model.tokenizer
        ids = tok.encode(PUSHES[names[-1]])
        if names[-1] == "think":
            ids = [tok.token_to_id("<think>"), *ids]
        return Push(ids, tok.encode("a")[0] if names[-1] == "think" else tok.token_to_id("<|endoftext|>"))


class Served:
    def __init__(self, model: localglm.Model, srv: ServerThread) -> None:
        self.model, self.srv = model, srv
        self.url = srv.base_url

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key="x", max_retries=0)


def serve(model: localglm.Model, **settings: Any) -> Iterator[Served]:
    app = create_app(model, ServerSettings(model_name="tiny", **settings), logits_processor_hook=PushHook(model))
    with ServerThread(app) as srv:
        yield Served(model, srv)


@pytest.fixture(scope="module")
def env(tiny_dir: Path) -> Iterator[Served]:
    yield from serve(localglm.load(tiny_dir, ctx=2048))


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ---- response_format -------------------------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
          "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}}, "required": ["name", "age", "tags"],
          "additionalProperties": False}  # fmt: skip


def test_json_schema_reply_validates(env: Served) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    for seed in range(3):
        r = env.openai().chat.completions.create(model="m", messages=user("a person"), response_format=fmt, seed=seed,
                                                 temperature=1.0, max_tokens=150, extra_body={"enable_thinking": False})  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_schema_streamed_and_with_thinking(env: Served) -> None:
    """Streamed, and with thinking on: the thinking block is free, the answer after it is JSON."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    text = ""
    for chunk in env.openai().chat.completions.create(model="m", messages=user("a person"), response_format=fmt, seed=1, temperature=1.0,
                                                      max_tokens=300, stream=True, reasoning_effort="low"):  # fmt: skip
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_on_completions(env: Served) -> None:
    for seed in range(2):
        r = env.openai().completions.create(model="m", prompt="data:", max_tokens=80, seed=seed, temperature=1.0,
                                            extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].text), dict)


def test_bad_response_format_is_400_naming_the_field(env: Served) -> None:
    cases = [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}, "response_format"),
    ]
    for fmt, param in cases:
        r = httpx.post(env.url + "/v1/chat/completions", json={"messages": user("x"), "response_format": fmt}, timeout=30)
        assert r.status_code == 400, fmt
        assert r.json()["error"]["param"] == param, r.json()


def test_anthropic_output_format(env: Served) -> None:
    body = {"model": "m", "max_tokens": 150, "messages": user("a person"), "temperature": 1.0, "thinking": {"type": "disabled"},
            "output_format": {"type": "json_schema", "schema": PERSON}}  # fmt: skip
    r = httpx.post(env.url + "/v1/messages", json=body, timeout=60).json()
    assert r["stop_reason"] == "end_turn"
    jsonschema.validate(json.loads(r["content"][-1]["text"]), PERSON)


# ---- tool_choice -----------------------------------------------------------------------------------
def check_calls(calls: list[tuple[str, dict[str, Any]]]) -> None:
    assert calls
    for name, args in calls:
        jsonschema.validate(args, SCHEMAS[name])


def test_openai_required_and_named(env: Served) -> None:
    client = env.openai()
    for seed in range(3):
        r = client.chat.completions.create(model="m", messages=user("go"), tools=TOOLS, tool_choice="required", seed=seed,
                                           temperature=1.0, max_tokens=200, extra_body={"enable_thinking": False})  # fmt: skip
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls([(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls])
    r = client.chat.completions.create(model="m", messages=user("go"), tools=TOOLS, seed=5, temperature=1.0, max_tokens=200,
                                       tool_choice={"type": "function", "function": {"name": "todo"}}, parallel_tool_calls=False)  # fmt: skip
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["todo"]
    check_calls([(c.function.name, json.loads(c.function.arguments)) for c in calls])


def test_openai_allowed_tools(env: Served) -> None:
    """Chat completions' tool_choice {type: allowed_tools}: calls only to the listed tools (was a 400 that asked
    for tool_choice.function)."""
    client = env.openai()
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "todo"}}]}}
    for seed in range(2):
        r = client.chat.completions.create(model="m", messages=user("go"), tools=TOOLS, tool_choice=choice, seed=seed,  # type: ignore[arg-type]
                                           temperature=1.0, max_tokens=200, extra_body={"enable_thinking": False})  # fmt: skip
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls and {c.function.name for c in calls} == {"todo"}
    bad = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "nope"}}]}}
    with pytest.raises(openai.BadRequestError, match="none of these tools is in tools"):
        client.chat.completions.create(model="m", messages=user("go"), tools=TOOLS, tool_choice=bad, max_tokens=5)  # type: ignore[arg-type]


def test_openai_required_streamed(env: Served) -> None:
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    finish = None
    for chunk in env.openai().chat.completions.create(model="m", messages=user("go"), tools=TOOLS, tool_choice="required", seed=2,
                                                      temperature=1.0, max_tokens=200, stream=True):  # fmt: skip
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or ():
            if tc.function.name:
                names[tc.index] = tc.function.name
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    check_calls([(names[i], json.loads(args[i])) for i in names])


def test_anthropic_any_tool_none(env: Served) -> None:
    client = env.anthropic()
    m = client.messages.create(model="m", max_tokens=200, messages=user("go"), tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"})
    assert m.stop_reason == "tool_use"
    check_calls([(b.name, b.input) for b in m.content if b.type == "tool_use"])
    m = client.messages.create(model="m", max_tokens=200, messages=user("go"), tools=ANTHROPIC_TOOLS,
                               tool_choice={"type": "tool", "name": "bash", "disable_parallel_tool_use": True})  # fmt: skip
    uses = [b for b in m.content if b.type == "tool_use"]
    assert [b.name for b in uses] == ["bash"]
    check_calls([(b.name, b.input) for b in uses])
    m = client.messages.create(model="m", max_tokens=60, messages=user("go PUSH:good"), tools=ANTHROPIC_TOOLS, tool_choice={"type": "none"})
    assert [b.type for b in m.content if b.type == "tool_use"] == []
    assert "<tool_call>" not in "".join(b.text for b in m.content if b.type == "text")


def test_pushed_malformed_calls_cannot_break(env: Served) -> None:
    client = env.openai()
    r = client.chat.completions.create(model="m", messages=user("go PUSH:good"), tools=TOOLS, max_tokens=100, temperature=1.0)
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("bash", {"command": "ls -la"})
    for name in ("noval", "nokey"):
        r = client.chat.completions.create(model="m", messages=user(f"go PUSH:{name}"), tools=TOOLS, max_tokens=100, temperature=1.0, seed=0)
        msg = r.choices[0].message
        check_calls([(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls or ()])  # a call, and valid
        assert "arg_key" not in (msg.content or "") and "arg_value" not in (msg.content or "")


def test_no_tool_grammar_lets_the_breakage_through(tiny_dir: Path) -> None:
    """The comparison the off switch is for: the same pushed malformed call parses wrong without it."""
    for served in serve(localglm.load(tiny_dir, ctx=2048), tool_grammar=False):
        r = served.openai().chat.completions.create(model="m", messages=user("go PUSH:noval"), tools=TOOLS, max_tokens=100)
        (call,) = r.choices[0].message.tool_calls
        assert json.loads(call.function.arguments) != {"command": "ls"}  # the argument is lost or mangled
        # required is still enforced (by the grammar) with the switch off
        r = served.openai().chat.completions.create(model="m", messages=user("go"), tools=TOOLS, tool_choice="required",
                                                    temperature=1.0, seed=0, max_tokens=200)  # fmt: skip
        assert r.choices[0].message.tool_calls


# ---- custom tools' input grammars (Responses API) ---------------------------------------------------
CALC = {"type": "custom", "name": "calc", "description": "Arithmetic", "format": {"type": "grammar", "syntax": "regex", "definition": "(add|sub) [0-9]{1,3}"}}


def test_responses_custom_tool_input_follows_its_grammar(env: Served) -> None:
    """A model pushed to write `multiply 12345` into a regex-formatted custom tool writes a matching input."""
    client = env.openai()
    for tool_choice in ("auto", {"type": "custom", "name": "calc"}):
        r = client.responses.create(model="m", input="go PUSH:calc", tools=[CALC], tool_choice=tool_choice, temperature=1.0,
                                    max_output_tokens=60, reasoning={"effort": "none"})  # fmt: skip
        calls = [o for o in r.output if o.type == "custom_tool_call"]
        assert calls or tool_choice == "auto", r.output
        for call in calls:
            assert call.name == "calc" and re.fullmatch(r"(add|sub) [0-9]{1,3}", call.input), call.input
    with client.responses.stream(model="m", input="go PUSH:calc", tools=[CALC], tool_choice={"type": "custom", "name": "calc"},
                                 parallel_tool_calls=False, temperature=1.0, max_output_tokens=60, reasoning={"effort": "none"}) as stream:  # fmt: skip
        final = stream.get_final_response()
    (call,) = [o for o in final.output if o.type == "custom_tool_call"]
    assert re.fullmatch(r"(add|sub) [0-9]{1,3}", call.input), call.input


def test_responses_custom_tool_grammar_errors_are_400_naming_the_field(env: Served) -> None:
    cases = [
        ({"type": "grammar", "syntax": "lark", "definition": "start: nowhere"}, "tools[0].format.definition"),
        ({"type": "grammar", "syntax": "regex", "definition": "(unclosed"}, "tools[0].format.definition"),
        # compiles, but no finite text matches it: found before generating, by walking into the tool's input
        ({"type": "grammar", "syntax": "lark", "definition": "start: a\na: start"}, "tools[0].format.definition"),
        ({"type": "grammar", "syntax": "peg", "definition": "x"}, "tools[0].format.syntax"),
        ({"type": "json"}, "tools[0].format.type"),
        ("lark", "tools[0].format"),
    ]
    for fmt, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            env.openai().responses.create(model="m", input="x", tools=[{**CALC, "format": fmt}])
        assert e.value.body["param"] == param and param in e.value.message, (fmt, e.value.body)


CHAT_CALC = {"type": "custom", "custom": {"name": "calc", "description": "Arithmetic",
             "format": {"type": "grammar", "grammar": {"syntax": "regex", "definition": "(add|sub) [0-9]{1,3}"}}}}  # fmt: skip


def test_chat_completions_custom_tools(env: Served) -> None:
    """Chat completions' `custom` tools: the input held to the tool's grammar, returned as `type: "custom"`
    (the SDK's ChatCompletionMessageCustomToolCall) and streamed in OpenAI's shape (`custom: {name, input}`);
    a custom call in the history goes back into the prompt."""
    client = env.openai()
    choice = {"type": "custom", "custom": {"name": "calc"}}
    one = {"parallel_tool_calls": False, "seed": 3, "temperature": 1.0, "max_tokens": 60, "extra_body": {"enable_thinking": False}}
    r = client.chat.completions.create(model="m", messages=user("go PUSH:calc"), tools=[CHAT_CALC], tool_choice=choice, **one)
    (call,) = r.choices[0].message.tool_calls
    assert call.type == "custom" and call.custom.name == "calc" and re.fullmatch(r"(add|sub) [0-9]{1,3}", call.custom.input), call
    pieces = [tc for chunk in client.chat.completions.create(model="m", messages=user("go PUSH:calc"), tools=[CHAT_CALC], tool_choice=choice,
                                                            stream=True, **one)
              for tc in (chunk.choices[0].delta.tool_calls or [] if chunk.choices else [])]  # fmt: skip
    first, *rest = [tc.model_dump(exclude_none=True) for tc in pieces]
    assert first["type"] == "custom" and first["custom"]["name"] == "calc" and "function" not in first
    streamed = "".join(piece["custom"]["input"] for piece in [first, *rest])
    assert re.fullmatch(r"(add|sub) [0-9]{1,3}", streamed), streamed
    history = [*user("go"), {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "42"}]  # fmt: skip
    as_function = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "calc", "arguments": json.dumps({"input": call.custom.input})}}]}  # fmt: skip
    counts = [client.chat.completions.create(model="m", messages=m, tools=[CHAT_CALC], max_tokens=1).usage.prompt_tokens
              for m in (history, [history[0], as_function, history[2]])]  # fmt: skip
    assert counts[0] == counts[1]  # the custom call is rendered as the function call the model wrote
    bad = {"type": "custom", "custom": {"name": "calc", "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": "start: nowhere"}}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=user("x"), tools=[bad], max_tokens=1)
    assert e.value.body["param"] == "tools[0].custom.format.grammar.definition"


# ---- context ---------------------------------------------------------------------------------------
def test_overflow_in_the_clients_words(tiny_dir: Path) -> None:
    for served in serve(localglm.load(tiny_dir, ctx=64)):
        long = user("word " * 100)
        with pytest.raises(openai.BadRequestError) as e:
            served.openai().chat.completions.create(model="m", messages=long)
        assert e.value.code == "context_length_exceeded"
        message = e.value.body["message"]
        assert re.fullmatch(r"This model's maximum context length is 64 tokens\. However, your messages resulted in \d+ tokens: .*--ctx\.", message)
        assert any(s in message.lower() for s in LITELLM_CONTEXT_SUBSTRINGS)
        with pytest.raises(anthropic.BadRequestError) as a:
            served.anthropic().messages.create(model="m", max_tokens=5, messages=long)
        assert re.match(r"prompt is too long: \d+ tokens > 64 maximum", a.value.body["error"]["message"])


def test_max_tokens_past_the_context_ends_with_the_context(tiny_dir: Path) -> None:
    """As llama-server: accepted, generated to the end of the context; the finish reason says so."""
    for served in serve(localglm.load(tiny_dir, ctx=64)):
        r = served.openai().chat.completions.create(model="m", messages=user("hi PUSH:think"), max_tokens=10_000)
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens + r.usage.completion_tokens == 64
        m = served.anthropic().messages.create(model="m", max_tokens=10_000, messages=user("hi PUSH:think"))
        assert m.stop_reason == "model_context_window_exceeded"
        assert m.usage.input_tokens + m.usage.cache_read_input_tokens + m.usage.output_tokens == 64
        m = served.anthropic().messages.create(model="m", max_tokens=3, messages=user("hi PUSH:think"))
        assert m.stop_reason == "max_tokens"


# ---- thinking budget -------------------------------------------------------------------------------
def test_anthropic_budget_tokens_closes_thinking(env: Served) -> None:
    """Pushed to think forever ("a" after "a"), the reply's thinking stops at budget_tokens and an answer follows."""
    for budget in (3, 10):
        m = env.anthropic().messages.create(model="m", max_tokens=budget + 8, messages=user("PUSH:think"),
                                            thinking={"type": "enabled", "budget_tokens": budget})  # fmt: skip
        kinds = [b.type for b in m.content]
        assert kinds == ["thinking", "text"], m.content
        assert m.content[0].thinking == "a" * budget
        assert m.content[1].text.startswith("a")


def test_reasoning_effort_closes_thinking(env: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EFFORT_BUDGETS, "low", 6)
    r = env.openai().chat.completions.create(model="m", messages=user("PUSH:think"), max_tokens=14, reasoning_effort="low", temperature=1.0)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "a" * 6
    assert msg.content.startswith("a")
    with pytest.raises(openai.BadRequestError) as e:
        env.openai().chat.completions.create(model="m", messages=user("x"), reasoning_effort="extreme")
    assert e.value.body["param"] == "reasoning_effort"
