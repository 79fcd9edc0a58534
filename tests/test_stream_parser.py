"""The streaming GLM output parser gives the same result however the text is split."""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass

import pytest

from localglm.chat.template import builtin_template, render_chat_template
from localglm.chat.stream_parser import (
    ChatStreamParser,
    ContentDelta,
    Event,
    ParsedMessage,
    ThinkingDelta,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    parse_complete,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "content": {"type": "string"},
                    "overwrite": {"type": "boolean"},
                    "opts": {"type": "object"},
                    "mode": {"type": ["string", "null"]},
                    "ratio": {"type": "number"},
                },
            },
        },
    },
    {"name": "now", "parameters": {"type": "object", "properties": {}}},
]

CODE = 'def f(x):\n    if x < 3 and "<tag>" in s:\n        return {"a": [1, 2]}\n\n'


@dataclass(frozen=True)
class Sample:
    text: str
    thinking: str
    content: str
    calls: list[tuple[str, dict]]
    start_in_thinking: bool = False
    truncated: bool = False


SAMPLES = {
    "glm45_reasoning_two_calls": Sample(
        text=(
            "\n<think>Let me look.\nTwo steps.</think>\nI'll check.\n"
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>São Paulo</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
            "<tool_call>now\n</tool_call>"
        ),
        thinking="Let me look.\nTwo steps.",
        content="I'll check.",
        calls=[("get_weather", {"city": "São Paulo", "days": 3}), ("now", {})],
    ),
    "glm47_thinking_start_typed_values": Sample(
        text=(
            "Plan: write the file.\n</think>Writing now."
            "<tool_call>write_file<arg_key>path</arg_key><arg_value>src/a.py</arg_value>"
            f"<arg_key>content</arg_key><arg_value>{CODE}</arg_value>"
            "<arg_key>overwrite</arg_key><arg_value>true</arg_value>"
            '<arg_key>opts</arg_key><arg_value>{"mode": 420, "tags": ["x", "ü"]}</arg_value>'
            "<arg_key>mode</arg_key><arg_value>null</arg_value>"
            "<arg_key>ratio</arg_key><arg_value>0.25</arg_value></tool_call>Done: 1 < 2."
        ),
        thinking="Plan: write the file.",
        content="Writing now.Done: 1 < 2.",
        calls=[
            (
                "write_file",
                {
                    "path": "src/a.py",
                    "content": CODE,
                    "overwrite": True,
                    "opts": {"mode": 420, "tags": ["x", "ü"]},
                    "mode": "null",
                    "ratio": 0.25,
                },
            )
        ],
        start_in_thinking=True,
    ),
    "glm45_text_before_and_after_calls": Sample(
        text=(
            "\n<think></think>\nFirst <b>bold</b> text.\n"
            "<tool_call>write_file\n<arg_key>path</arg_key>\n<arg_value>123</arg_value>\n"
            "<arg_key>content</arg_key>\n<arg_value>line1\n\n  line3\r\n</arg_value>\n</tool_call>\n"
            "Then more <thinking> text.\n<|observation|>ignored <tool_call>now</tool_call>"
        ),
        thinking="",
        content="First <b>bold</b> text.\n\nThen more <thinking> text.",
        calls=[("write_file", {"path": "123", "content": "line1\n\n  line3\r\n"})],
    ),
    "glm47_untyped_and_zero_arg": Sample(
        text=(
            "<think>hmm <th> <tool_call>not a call</think>"
            "<tool_call>unknown<arg_key>a</arg_key><arg_value>12</arg_value>"
            "<arg_key>b</arg_key><arg_value>not json</arg_value>"
            '<arg_key>c</arg_key><arg_value>"quoted"</arg_value>'
            '<arg_key>d</arg_key><arg_value>[1, {"x": null}]</arg_value>'
            "<arg_key>e</arg_key><arg_value>NaN</arg_value></tool_call><tool_call>now</tool_call>"
            "<|endoftext|>"
        ),
        thinking="hmm <th> <tool_call>not a call",
        content="",
        calls=[("unknown", {"a": 12, "b": "not json", "c": "quoted", "d": [1, {"x": None}], "e": "NaN"}), ("now", {})],
    ),
    "glm47_schema_fallbacks": Sample(
        text=(
            "</think>"
            "<tool_call>get_weather<arg_key>city</arg_key><arg_value>123</arg_value>"
            "<arg_key>days</arg_key><arg_value>seven</arg_value></tool_call>"
        ),
        thinking="",
        content="",
        calls=[("get_weather", {"city": "123", "days": "seven"})],
        start_in_thinking=True,
    ),
    "plain_content_with_stray_user": Sample(
        text="Answer: x<y && a>b, see </tool_call> <|user|>\nnext question",
        thinking="",
        content="Answer: x<y && a>b, see </tool_call>",
        calls=[],
    ),
    "truncated_call": Sample(
        text="Sure.<tool_call>write_file<arg_key>path</arg_key><arg_value>a.txt</arg_value><arg_key>content</arg_key><arg_value>par",
        thinking="",
        content="Sure.",
        calls=[("write_file", {"path": "a.txt", "content": "par"})],
        truncated=True,
    ),
}


def run(chunks: list[str], sample: Sample) -> tuple[ParsedMessage, list[Event]]:
    parser = ChatStreamParser(start_in_thinking=sample.start_in_thinking, tools=TOOLS)
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    return ParsedMessage.from_events(events), events


def check(sample: Sample, chunks: list[str]) -> None:
    msg, events = run(chunks, sample)
    where = f"split {[len(c) for c in chunks][:3]}..."
    assert msg.thinking == sample.thinking, where
    assert msg.content == sample.content, where
    assert [(c.name, c.arguments) for c in msg.tool_calls] == sample.calls, where
    assert all(c.truncated == (sample.truncated and i == len(msg.tool_calls) - 1) for i, c in enumerate(msg.tool_calls))
    # Streaming protocol: starts, argument deltas and ends agree with the final calls.
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    ends = [e for e in events if isinstance(e, ToolCallEnd)]
    assert [e.index for e in starts] == [e.index for e in ends] == list(range(len(sample.calls)))
    for start, end in zip(starts, ends, strict=True):
        assert re.fullmatch(r"call_[0-9a-f]{24}", start.id) and start.id == end.call.id
        assert start.name == end.call.name
        args_text = "".join(e.text for e in events if isinstance(e, ToolCallArgsDelta) and e.index == start.index)
        assert json.loads(args_text) == end.call.arguments
        assert args_text == end.call.arguments_json
        assert events.index(start) < events.index(end)
    assert len({e.id for e in starts}) == len(starts)
    assert all(e.text for e in events if isinstance(e, (ContentDelta, ThinkingDelta, ToolCallArgsDelta)))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_whole_text(name: str) -> None:
    sample = SAMPLES[name]
    check(sample, [sample.text])
    parsed = parse_complete(sample.text, start_in_thinking=sample.start_in_thinking, tools=TOOLS)
    assert (parsed.thinking, parsed.content) == (sample.thinking, sample.content)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == sample.calls


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_two_chunk_split(name: str) -> None:
    sample = SAMPLES[name]
    for cut in range(len(sample.text) + 1):
        check(sample, [sample.text[:cut], sample.text[cut:]])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_one_character_at_a_time(name: str) -> None:
    sample = SAMPLES[name]
    check(sample, list(sample.text))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_random_multi_chunk_splits(name: str) -> None:
    sample = SAMPLES[name]
    rng = random.Random(name)
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(sample.text) + 1), k=min(6, len(sample.text))))
        bounds = [0, *cuts, len(sample.text)]
        check(sample, [sample.text[a:b] for a, b in itertools.pairwise(bounds)])


# ---- exact streaming behaviour -----------------------------------------------------------------


def test_partial_tags_are_held_then_released() -> None:
    p = ChatStreamParser(tools=TOOLS)
    assert p.feed("Hi <th") == [ContentDelta("Hi")]
    assert p.feed("ere") == [ContentDelta(" <there")]
    assert p.feed(" <") == []
    assert p.feed("/") == []
    assert p.feed("thinks") == [ContentDelta(" </thinks")]
    assert p.feed("<tool_ca") == []
    [start] = p.feed("ll>get_weather\n")
    assert isinstance(start, ToolCallStart) and (start.index, start.name) == (0, "get_weather")
    assert p.feed("<arg_key>ci") == []
    assert p.feed("ty</arg_key>\n<arg_value>Ro") == [ToolCallArgsDelta(0, '{"city": "Ro')]
    assert p.feed("me</arg_v") == [ToolCallArgsDelta(0, "me")]
    assert p.feed("alue>\n<arg_key>days</arg_key>\n<arg_value>2") == [ToolCallArgsDelta(0, '", "days": ')]
    assert p.feed("</arg_value>\n</tool_call>") == [
        ToolCallArgsDelta(0, "2}"),
        ToolCallEnd(0, ToolCall(start.id, "get_weather", {"city": "Rome", "days": 2})),
    ]
    assert p.finish() == []


def test_schema_types_streamed_values() -> None:
    p = ChatStreamParser(tools=TOOLS)
    p.feed("<tool_call>get_weather<arg_key>city</arg_key><arg_value>")
    assert p.feed("Ro") == [ToolCallArgsDelta(0, "Ro")]  # string parameters stream as they arrive
    p.feed("me</arg_value><arg_key>days</arg_key><arg_value>")
    assert p.feed("1") == []  # typed values wait for </arg_value>
    assert p.feed("4</arg_value>") == [ToolCallArgsDelta(0, "14")]
    [args, end] = p.feed("</tool_call>")
    assert args == ToolCallArgsDelta(0, "}")
    assert end.call.arguments == {"city": "Rome", "days": 14}
    assert end.call.arguments_json == '{"city": "Rome", "days": 14}'


def test_start_in_thinking_and_unopened_close() -> None:
    p = ChatStreamParser(start_in_thinking=True)
    assert p.feed("\nreason") == [ThinkingDelta("reason")]
    assert p.feed("ing\n</thi") == [ThinkingDelta("ing")]
    assert p.feed("nk>\n\nAnswer\n") == [ContentDelta("Answer")]
    assert p.finish() == []
    assert parse_complete("no close tag at all", start_in_thinking=True) == ParsedMessage("no close tag at all", "", [])


def test_empty_think_block_emits_nothing() -> None:
    assert ChatStreamParser().feed("\n<think></think>\n") == []
    assert parse_complete("\n<think></think>\nHello") == ParsedMessage("", "Hello", [])


def test_stop_tokens_end_the_reply() -> None:
    for stop in ("<|user|>", "<|observation|>", "<|endoftext|>", "<|system|>", "<|assistant|>"):
        p = ChatStreamParser()
        assert p.feed(f"done{stop[:4]}") == [ContentDelta("done")]
        assert p.feed(stop[4:] + "more text") == []
        assert p.stopped
        assert p.feed("<think>x</think>y") == []
        assert p.finish() == []
    with pytest.raises(RuntimeError):
        p.feed("late")


def test_call_closed_by_stop_token_is_complete() -> None:
    msg = parse_complete("<tool_call>now\n<|observation|>", tools=TOOLS)
    assert [(c.name, c.arguments, c.truncated) for c in msg.tool_calls] == [("now", {}, False)]
    msg = parse_complete("<tool_call></tool_call>ok<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>")
    assert msg == ParsedMessage("", "ok", [])  # calls without a name are dropped


def test_for_prompt_starts_in_thinking_only_after_open_think() -> None:
    def first(prompt: str) -> Event:
        return ChatStreamParser.for_prompt(prompt).feed("x</think>y")[0]

    assert first("[gMASK]<sop><|user|>hi<|assistant|><think>") == ThinkingDelta("x")
    assert first("[gMASK]<sop><|user|>hi<|assistant|></think>") == ContentDelta("xy")
    assert first("[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>") == ContentDelta("xy")


def test_call_ids_are_unique() -> None:
    ids = {parse_complete("<tool_call>now</tool_call>").tool_calls[0].id for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize("style", ["glm45", "glm47"])
def test_parser_reads_back_what_the_template_writes(style: str) -> None:
    """An assistant turn rendered by our template parses back to the same message."""
    arguments = {
        "path": "notes.md",
        "content": "# Title\n\n- a < b\n- <b>x</b>\n",
        "overwrite": False,
        "opts": {"k": [1]},
    }
    turn = {
        "role": "assistant",
        "reasoning_content": "Write the notes.",
        "content": "Saving the file.",
        "tool_calls": [
            {"type": "function", "function": {"name": "write_file", "arguments": arguments}},
            {"type": "function", "function": {"name": "now", "arguments": {}}},
        ],
    }
    rendered = render_chat_template(
        builtin_template(style), [{"role": "user", "content": "go"}, turn], add_generation_prompt=False
    )
    reply = rendered.split("<|assistant|>", 1)[1]
    msg = parse_complete(reply, tools=TOOLS)
    assert (msg.thinking, msg.content) == ("Write the notes.", "Saving the file.")
    assert [(c.name, c.arguments) for c in msg.tool_calls] == [("write_file", arguments), ("now", {})]


def test_end_inside_a_call_marks_it_truncated() -> None:
    def calls(text: str) -> list[tuple[str, dict, bool]]:
        return [(c.name, c.arguments, c.truncated) for c in parse_complete(text, tools=TOOLS).tool_calls]

    assert calls("<tool_call>now") == [("now", {}, True)]
    assert calls("<tool_call>now<|observation|>") == [("now", {}, False)]
    assert calls("<tool_call>get_weather<arg_key>ci") == [("get_weather", {}, True)]
    assert calls("<tool_call>get_weather<arg_key>city</arg_key>") == [("get_weather", {"city": ""}, True)]
    assert calls("<tool_call>get_weather<arg_key>days</arg_key><arg_value>4</arg_value>") == [
        ("get_weather", {"days": 4}, False)
    ]
