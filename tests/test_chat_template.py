"""Chat templates: our renderer equals transformers', and our GLM templates write the exact GLM formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from localglm.chat.template import ChatTemplate, builtin_template, render_chat_template
from localglm.errors import TokenizerError
from localglm.chat.tiny_tokenizer import build_tiny_tokenizer
from localglm.chat.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather — in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TOOLS = [WEATHER_TOOL, {"name": "now", "description": "Time", "parameters": {"type": "object", "properties": {}}}]

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
    ],
    "multi_turn_reasoning": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "\n6\n", "reasoning_content": "\nAgain simple.\n"},
    ],
    "tool_calls": [
        {"role": "user", "content": "Weather in Zürich for 3 days, and the time?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Two tools.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}},
                {"type": "function", "function": {"name": "now", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "21°C and noon.", "tool_calls": None},
        {"role": "user", "content": "Store it", "name": None},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "save",
                        "arguments": {"text": "line 1\nline 2", "meta": {"tags": ["a", "ü"], "ok": True}, "n": None},
                    },
                }
            ],
        },
        {"role": "tool", "content": "saved"},
    ],
    "list_content": [
        {"role": "system", "content": [{"type": "text", "text": "Sys "}, {"type": "text", "text": "prompt"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "part one, "}, {"type": "image"}, {"type": "text", "text": "two"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "<think>inline thoughts</think>\nAnswer."}]},
    ],
    "inline_think_and_aliases": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>old</think>a1"},
        {"role": "user", "content": "q2 /nothink"},
        {"role": "assistant", "content": "a2", "thinking": "via thinking field"},
        {"role": "assistant", "content": "a3", "reasoning": "via reasoning field"},
    ],
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for style in ("glm45", "glm47"):
        d = tmp_path_factory.mktemp(style)
        build_tiny_tokenizer(d, vocab_size=320, style=style)
        out[style] = d
    return out


@pytest.fixture(scope="module")
def toks(dirs: dict[str, Path]) -> dict[str, tuple[Tokenizer, object]]:
    return {s: (Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)) for s, d in dirs.items()}


@pytest.mark.parametrize("style", ["glm45", "glm47"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_render_equals_transformers(toks, style: str, name: str, thinking: bool | None, with_tools: bool) -> None:
    ours, hf = toks[style]
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    extra = {} if thinking is None else {"enable_thinking": thinking}
    expected = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False, **extra)
    assert ours.apply_chat_template(messages, tools=tools, enable_thinking=thinking) == expected
    assert (
        render_chat_template(
            builtin_template(style),
            messages,
            tools=tools,
            enable_thinking=thinking,
            special_tokens=ours.special_tokens_map,
        )
        == expected
    )
    no_prompt = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=False, tokenize=False, **extra)
    assert (
        ours.apply_chat_template(messages, tools=tools, add_generation_prompt=False, enable_thinking=thinking)
        == no_prompt
    )


# ---- exact GLM-4.5 format ----------------------------------------------------------------------


def test_glm45_system_user_exact(toks) -> None:
    tok = toks["glm45"][0]
    msgs = CONVERSATIONS["system_user"]
    assert tok.apply_chat_template(msgs) == "[gMASK]<sop><|system|>\nYou are terse.<|user|>\nHello there<|assistant|>"
    assert tok.apply_chat_template(msgs, enable_thinking=True) == (
        "[gMASK]<sop><|system|>\nYou are terse.<|user|>\nHello there<|assistant|>"
    )
    assert tok.apply_chat_template(msgs, enable_thinking=False) == (
        "[gMASK]<sop><|system|>\nYou are terse.<|user|>\nHello there/nothink<|assistant|>\n<think></think>"
    )


def test_glm45_reasoning_kept_only_after_last_user(toks) -> None:
    tok = toks["glm45"][0]
    out = tok.apply_chat_template(CONVERSATIONS["multi_turn_reasoning"], add_generation_prompt=False)
    assert out == (
        "[gMASK]<sop><|user|>\nWhat is 2+2?<|assistant|>\n<think></think>\n4"
        "<|user|>\nAnd 3+3?<|assistant|>\n<think>Again simple.</think>\n6"
    )


def test_glm45_tool_calls_and_results_exact(toks) -> None:
    tok = toks["glm45"][0]
    out = tok.apply_chat_template(CONVERSATIONS["tool_calls"], tools=[WEATHER_TOOL])
    tools_block = (
        "<|system|>\n# Tools\n\nYou can call the functions described below to help with the request.\n\n"
        "Their JSON signatures are listed one per line between <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather — in °C", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
        '"required": ["city"]}}}\n</tools>\n\n'
        "To call a function, write its name and each argument in this XML layout:\n"
        "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
        "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
    )
    assert (
        out
        == (
            "[gMASK]<sop>" + tools_block + "<|user|>\nWeather in Zürich for 3 days, and the time?"
            "<|assistant|>\n<think></think>\nChecking."  # reasoning before the last user turn is dropped
            "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Zürich</arg_value>"
            "\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
            "\n<tool_call>now\n</tool_call>"
            '<|observation|>\n<tool_response>\n{"temp": 21, "sky": "clear"}\n</tool_response>'
            "\n<tool_response>\n12:00\n</tool_response>"
            "<|assistant|>\n<think></think>\n21°C and noon."
            "<|user|>\nStore it"
            "<|assistant|>\n<think></think>"
            "\n<tool_call>save\n<arg_key>text</arg_key>\n<arg_value>line 1\nline 2</arg_value>"
            '\n<arg_key>meta</arg_key>\n<arg_value>{"tags": ["a", "ü"], "ok": true}</arg_value>'
            "\n<arg_key>n</arg_key>\n<arg_value>null</arg_value>\n</tool_call>"
            "<|observation|>\n<tool_response>\nsaved\n</tool_response>"
            "<|assistant|>"
        )
    )


def test_glm45_list_content_and_inline_think(toks) -> None:
    tok = toks["glm45"][0]
    out = tok.apply_chat_template(CONVERSATIONS["list_content"], enable_thinking=False)
    assert out == (
        "[gMASK]<sop><|system|>\nSys prompt<|user|>\npart one, two/nothink"
        "<|assistant|>\n<think>inline thoughts</think>\nAnswer.<|assistant|>\n<think></think>"
    )
    out = tok.apply_chat_template(CONVERSATIONS["inline_think_and_aliases"], enable_thinking=False)
    assert out == (
        "[gMASK]<sop><|user|>\nq1/nothink<|assistant|>\n<think></think>\na1"
        "<|user|>\nq2 /nothink<|assistant|>\n<think>via thinking field</think>\na2"
        "<|assistant|>\n<think>via reasoning field</think>\na3<|assistant|>\n<think></think>"
    )


# ---- exact GLM-4.7 format ----------------------------------------------------------------------


def test_glm47_generation_prompt_and_turns_exact(toks) -> None:
    tok = toks["glm47"][0]
    msgs = CONVERSATIONS["system_user"]
    assert (
        tok.apply_chat_template(msgs) == "[gMASK]<sop><|system|>You are terse.<|user|>Hello there<|assistant|><think>"
    )
    assert tok.apply_chat_template(msgs, enable_thinking=True) == (
        "[gMASK]<sop><|system|>You are terse.<|user|>Hello there<|assistant|><think>"
    )
    assert tok.apply_chat_template(msgs, enable_thinking=False) == (
        "[gMASK]<sop><|system|>You are terse.<|user|>Hello there<|assistant|></think>"
    )
    out = tok.apply_chat_template(CONVERSATIONS["multi_turn_reasoning"], add_generation_prompt=False)
    assert out == (
        "[gMASK]<sop><|user|>What is 2+2?<|assistant|></think>4"
        "<|user|>And 3+3?<|assistant|><think>Again simple.</think>6"
    )
    kept = tok.apply_chat_template(
        CONVERSATIONS["multi_turn_reasoning"], add_generation_prompt=False, clear_thinking=False
    )
    assert "<|assistant|><think>Simple sum.</think>4" in kept


def test_glm47_tool_calls_exact(toks) -> None:
    tok = toks["glm47"][0]
    out = tok.apply_chat_template(CONVERSATIONS["tool_calls"][:5], enable_thinking=False)
    assert out == (
        "[gMASK]<sop><|user|>Weather in Zürich for 3 days, and the time?"
        "<|assistant|><think>Two tools.</think>Checking."
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Zürich</arg_value>"
        "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call><tool_call>now</tool_call>"
        '<|observation|><tool_response>{"temp": 21, "sky": "clear"}</tool_response><tool_response>12:00</tool_response>'
        "<|assistant|></think>21°C and noon.<|assistant|></think>"
    )
    tools_out = tok.apply_chat_template(CONVERSATIONS["system_user"], tools=[WEATHER_TOOL])
    assert "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>" in tools_out
    assert tools_out.startswith("[gMASK]<sop><|system|>\n# Tools\n\n")


# ---- renderer behaviour ------------------------------------------------------------------------


def test_string_tool_arguments_are_parsed_before_rendering(toks) -> None:
    tok = toks["glm45"][0]
    as_dict = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": "x", "b": [1]}}}]}]
    as_text = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": "x", "b": [1]}'}}]}]
    assert tok.apply_chat_template(as_text) == tok.apply_chat_template(as_dict)
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{nope"}}]}]
    with pytest.raises(TokenizerError, match="tool call 'f': arguments are not valid JSON"):
        tok.apply_chat_template(bad)
    with pytest.raises(TokenizerError, match="arguments must be an object"):
        render_chat_template(builtin_template("glm45"), as_text)


ENV_PROBE = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}{%- if loop.index > 2 %}{% break %}{% endif -%}{%- set ns.n = ns.n + 1 -%}{%- endfor -%}
{{ ns.n }}|{{ tools | tojson }}|{{ tools | tojson(indent=2, sort_keys=True) }}|{{ bos_token }}|{{ eos_token }}
{% generation %}  gen {{ messages[0].reasoning_content }}{% endgeneration %}
{{ dict(a=1) | tojson(separators=(',', ':')) }}{{ custom }}|{{ enable_thinking is defined }}|{{ strftime_now('%Y') | length }}
  {% if add_generation_prompt %}
    <PROMPT>
  {% endif %}
"""


def test_environment_matches_transformers(toks) -> None:
    """trim_blocks/lstrip_blocks, loopcontrols, tojson options, namespace, generation tag, globals."""
    ours, hf = toks["glm45"]
    msgs = [
        {"role": "user", "content": "a", "thinking": "t"},
        {"role": "user", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    tools = [{"name": '<tag> & "q" é', "parameters": {"z": 1, "a": [1, 2]}}]
    kwargs = {"custom": "X"}
    expected = hf.apply_chat_template(
        msgs, tools=tools, chat_template=ENV_PROBE, add_generation_prompt=True, tokenize=False, **kwargs
    )
    got = render_chat_template(ENV_PROBE, msgs, tools=tools, special_tokens=ours.special_tokens_map, **kwargs)
    assert got == expected
    assert "||<|endoftext|>\n" in got  # no bos_token in the config: undefined renders empty
    assert got.startswith('2|[{"name": "<tag> & \\"q\\" é", "parameters": {"z": 1, "a": [1, 2]}}]|[\n  {\n')
    assert got.endswith('<|endoftext|>\n  gen t{"a":1}X|False|4\n    <PROMPT>\n')


def test_template_errors_are_tokenizer_errors() -> None:
    with pytest.raises(TokenizerError, match=r"my.jinja: Jinja syntax error at line 1"):
        ChatTemplate("{% if %}", name="my.jinja")
    boom = ChatTemplate("{{ raise_exception('no system role\nplease') }}", name="boom.jinja")
    with pytest.raises(TokenizerError, match=r"^boom\.jinja: rendering failed: no system role please$"):
        boom.render([{"role": "user", "content": "x"}])
    sandbox = ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}", name="s.jinja")
    with pytest.raises(TokenizerError, match=r"s\.jinja"):
        sandbox.render([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="non-empty list"):
        boom.render([])


def test_chat_template_object_compiles_once() -> None:
    template = ChatTemplate(builtin_template("glm47"), name="glm47")
    compiled = template._compiled
    msgs = [{"role": "user", "content": "hi"}]
    assert render_chat_template(template, msgs) == "[gMASK]<sop><|user|>hi<|assistant|><think>"
    assert render_chat_template(template, msgs, enable_thinking=False) == "[gMASK]<sop><|user|>hi<|assistant|></think>"
    assert template._compiled is compiled


def test_messages_are_not_modified(toks) -> None:
    tok = toks["glm45"][0]
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "thinking": "t", "tool_calls": None},
    ]
    snapshot = [dict(m) for m in msgs]
    tok.apply_chat_template(msgs)
    assert msgs == snapshot
