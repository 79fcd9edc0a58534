"""`localglm serve` end to end: a real server on a loopback port, a real tiny model, the official clients.

Model output that matters (thinking, tool calls, split tags, role tokens) is forced token by token
through the app's test hook (`ScriptedOutput`: a request containing `SCRIPT:<name>` gets that
script), so GLM's tool-call and reasoning parsing runs through the whole stack: engine, parser,
queue, SSE, and the clients' own parsers.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import torch

import localglm
from localglm.server.testing import READ_FILE_CALL, ScriptedOutput, ServerThread, scripted_server
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}},
    },
]
ANTHROPIC_TOOLS = [
    {"name": t["function"]["name"], "description": t["function"]["description"], "input_schema": t["function"]["parameters"]}
    for t in TOOLS
]
READ_CALL_45 = READ_FILE_CALL


@dataclass
class Env:
    model: localglm.Model
    scripts: ScriptedOutput
    srv: ServerThread

    @property
    def url(self) -> str:
        return self.srv.base_url

    def openai(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw)

    def anthropic(self, **kw: Any) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw)

    def prompt_tokens(self, messages: list[dict], tools: list | None = None, enable_thinking: bool | None = None) -> int:
        text = self.model.render_chat(messages, tools=tools, enable_thinking=enable_thinking)
        return len(self.model.tokenizer.encode(text))

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def metric(self, name: str, default: float | None = None) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        m = re.search(rf"^localglm_{re.escape(name)} (\S+)$", text, re.M)
        if m is None and default is not None:
            return default
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if not h["busy"] and h["queue_waiting"] == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"engine still busy after {timeout}s: {self.health()}")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from a second thread, and on a busy 2-core machine OpenMP threads
    fighting for cores make every token 10-30x slower; restore the setting for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def _serve(model: localglm.Model, **settings: Any) -> Iterator[Env]:
    with scripted_server(model, **settings) as (scripts, srv):
        yield Env(model, scripts, srv)


@pytest.fixture(scope="module")
def env(tiny_dir: Path) -> Iterator[Env]:
    with _serve(localglm.load(tiny_dir)) as e:
        yield e


@pytest.fixture(scope="module")
def env47(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    path = make_tiny(tmp_path_factory.mktemp("tiny47") / "model", TinySpec(chat_style="glm47"))
    with _serve(localglm.load(path)) as e:
        yield e


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def sse_lines(env: Env, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", env.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


def anthropic_events(env: Env, body: dict) -> list[tuple[str, dict]]:
    lines = sse_lines(env, "/v1/messages", {**body, "stream": True})
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


# ---- OpenAI: basics ------------------------------------------------------------------------------
def test_models_health_and_root(env: Env) -> None:
    models = env.openai().models.list()
    assert [m.id for m in models.data] == ["tiny-glm"]
    assert env.openai().models.retrieve("tiny-glm").id == "tiny-glm"
    with pytest.raises(openai.NotFoundError):
        env.openai().models.retrieve("other-model")
    h = env.health()
    assert h["status"] == "ok" and h["ctx"] == env.model.ctx and h["queue_size"] == 16


def test_chat_non_streaming_reasoning_content_and_usage(env: Env) -> None:
    ids = env.scripts.add("basic", "<think>plan it</think>Hello world")
    msgs = user("say hi SCRIPT:basic")
    r = env.openai().chat.completions.create(model="tiny-glm", messages=msgs)
    msg = r.choices[0].message
    assert msg.content == "Hello world" and "<think>" not in msg.content and "</think>" not in msg.content
    assert msg.reasoning_content == "plan it"
    assert not msg.tool_calls
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == env.prompt_tokens(msgs)
    assert r.usage.completion_tokens == len(ids)  # the end-of-turn token counts too
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert isinstance(r.usage.prompt_tokens_details.cached_tokens, int)


def test_chat_streaming_reasoning_content_usage_and_done(env: Env) -> None:
    env.scripts.add("stream1", "<think>step one, step two</think>The answer is 42.")
    stream = env.openai().chat.completions.create(
        model="tiny-glm", messages=user("q SCRIPT:stream1"), stream=True, stream_options={"include_usage": True}
    )
    reasoning, content, finish, usage, n_reasoning = "", "", None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if getattr(delta, "reasoning_content", None):
                reasoning += delta.reasoning_content
                n_reasoning += 1
            content += delta.content or ""
            finish = choice.finish_reason or finish
    assert reasoning == "step one, step two" and n_reasoning > 1  # streamed, not in one piece
    assert content == "The answer is 42."
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens_details.cached_tokens >= 0
    lines = sse_lines(env, "/v1/chat/completions", {"messages": user("q SCRIPT:stream1"), "stream": True})
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_completions_endpoint(env: Env) -> None:
    env.scripts.add("raw", " = 42\n", end="<|endoftext|>")
    c = env.openai().completions.create(model="tiny-glm", prompt="answer SCRIPT:raw", max_tokens=20)
    assert c.choices[0].text == " = 42\n" and c.choices[0].finish_reason == "stop"
    assert c.usage.prompt_tokens == len(env.model.tokenizer.encode("answer SCRIPT:raw"))
    pieces = [ch.choices[0].text for ch in env.openai().completions.create(model="m", prompt="answer SCRIPT:raw", stream=True, echo=True) if ch.choices]
    assert "".join(pieces) == "answer SCRIPT:raw = 42\n"
    short = env.openai().completions.create(model="tiny-glm", prompt="x", max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    ids = env.openai().completions.create(model="tiny-glm", prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_max_tokens_and_stop_sequences(env: Env) -> None:
    env.scripts.add("long", "alpha beta STOP gamma delta epsilon")
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:long"), max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:long"), max_completion_tokens=3)
    assert r.usage.completion_tokens == 3
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:long"), stop=["STOP"])
    assert r.choices[0].message.content == "alpha beta" and r.choices[0].finish_reason == "stop"
    m = env.anthropic().messages.create(model="m", max_tokens=50, messages=user("SCRIPT:long"), stop_sequences=["STOP"])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "STOP"
    assert [b.text for b in m.content] == ["alpha beta"]
    m = env.anthropic().messages.create(model="m", max_tokens=2, messages=user("SCRIPT:long"))
    assert m.stop_reason == "max_tokens"


# ---- OpenAI: tool calls ------------------------------------------------------------------------------
def test_tool_call_round_trip_with_prefix_reuse(env: Env) -> None:
    env.scripts.add("call1", READ_CALL_45, end="<|observation|>")
    env.scripts.add("after", "The file has 20 lines.")
    client = env.openai()
    msgs = user("read it SCRIPT:call1")
    r1 = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
    choice = r1.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id and call.type == "function" and call.function.name == "read_file"
    assert json.loads(call.function.arguments) == {"path": "src/a b.py", "limit": 20}
    assert choice.message.content in (None, "")
    # The agent's next turn: the whole conversation again, plus the tool result.
    msgs2 = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "line 1\nline 2 SCRIPT:after"},
    ]
    r2 = client.chat.completions.create(model="m", messages=msgs2, tools=TOOLS)
    assert r2.choices[0].message.content == "The file has 20 lines."
    assert r2.usage.prompt_tokens == env.prompt_tokens(msgs2, tools=TOOLS)
    # Not re-prefilled from scratch: at least the whole previous prompt came from the KV cache.
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert r2.timings["cache_n"] == r2.usage.prompt_tokens_details.cached_tokens


def test_tool_call_arguments_stream_with_ids_and_real_newlines(env: Env) -> None:
    code = 'def f():\n    return "x"\n'
    env.scripts.add(
        "call_nl",
        f"<tool_call>read_file\n<arg_key>path</arg_key>\n<arg_value>{code}</arg_value>\n</tool_call>",
        end="<|observation|>",
    )
    stream = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:call_nl"), tools=TOOLS, stream=True)
    starts, arg_chunks, finish = [], [], None
    for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                if tc.id:
                    starts.append((tc.index, tc.id, tc.function.name))
                if tc.function and tc.function.arguments:
                    arg_chunks.append(tc.function.arguments)
            finish = choice.finish_reason or finish
    assert len(starts) == 1 and starts[0][0] == 0 and starts[0][1].startswith("call_") and starts[0][2] == "read_file"
    assert len(arg_chunks) > 2  # arguments arrive as they are generated, not in one piece at the end
    args = json.loads("".join(arg_chunks))
    assert args == {"path": code}  # newlines and quotes arrive verbatim, not as escaped text
    assert "\\n" not in args["path"] and finish == "tool_calls"


def test_zero_argument_and_parallel_tool_calls(env: Env) -> None:
    env.scripts.add("noargs", "<tool_call>get_time\n</tool_call>", end="<|observation|>")
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:noargs"), tools=TOOLS)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and call.function.arguments == "{}" and call.id
    chunks = list(env.openai().chat.completions.create(model="m", messages=user("SCRIPT:noargs"), tools=TOOLS, stream=True))
    names = [tc.function.name for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or [] if tc.function.name]
    assert names == ["get_time"]
    m = env.anthropic().messages.create(model="m", max_tokens=50, messages=user("SCRIPT:noargs"), tools=ANTHROPIC_TOOLS)
    assert [(b.type, b.name, b.input) for b in m.content] == [("tool_use", "get_time", {})] and m.stop_reason == "tool_use"

    env.scripts.add("two", "<tool_call>get_time\n</tool_call>" + READ_CALL_45, end="<|observation|>")
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:two"), tools=TOOLS)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time", "read_file"]
    assert len({c.id for c in calls}) == 2
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:two"), tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]


def test_tool_choice_none_emits_no_tools(env: Env) -> None:
    env.scripts.add("unwanted", "Sure." + READ_CALL_45, end="<|observation|>")
    msgs = user("SCRIPT:unwanted")
    r = env.openai().chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice="none")
    msg = r.choices[0].message
    assert not msg.tool_calls and msg.content == "Sure." and r.choices[0].finish_reason == "stop"
    assert "<tool_call>" not in (msg.content or "")
    assert r.usage.prompt_tokens == env.prompt_tokens(msgs)  # the tools were not put in the prompt
    chunks = list(env.openai().chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice="none", stream=True))
    assert not any(ch.delta.tool_calls for c in chunks for ch in c.choices)
    m = env.anthropic().messages.create(
        model="m", max_tokens=100, messages=msgs, tools=ANTHROPIC_TOOLS, tool_choice={"type": "none"}
    )
    assert [b.type for b in m.content] == ["text"] and m.stop_reason == "end_turn"
    named = env.openai().chat.completions.create(
        model="m", messages=msgs, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "read_file"}}
    )
    assert named.usage.prompt_tokens == env.prompt_tokens(msgs, tools=TOOLS[:1])


# ---- the failures coding agents hit on peers' GLM backends ------------------------------------------
def test_xml_tool_calls_are_parsed_not_shown_as_text(env: Env) -> None:
    env.scripts.add("xml", "Let me look." + READ_CALL_45, end="<|observation|>")
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:xml"), tools=TOOLS)
    msg = r.choices[0].message
    assert msg.content == "Let me look."
    assert not any(tag in (msg.content or "") for tag in ("<tool_call>", "<arg_key>", "<arg_value>", "</tool_call>"))
    assert msg.tool_calls[0].function.name == "read_file"


def test_partial_tags_split_across_tokens_never_leak(env: Env) -> None:
    env.scripts.add(
        "split",
        "<th", "ink>", "weigh it", "</th", "ink>", "Ans", "wer<", "tool_", "call>get_time", "\n</tool", "_call>",
        end="<|observation|>",
    )
    msgs = user("SCRIPT:split")
    r = env.openai().chat.completions.create(model="m", messages=msgs, tools=TOOLS)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == ("weigh it", "Answer")
    assert [c.function.name for c in msg.tool_calls] == ["get_time"]
    chunks = list(env.openai().chat.completions.create(model="m", messages=msgs, tools=TOOLS, stream=True))
    streamed = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    reasoning = "".join(getattr(ch.delta, "reasoning_content", None) or "" for c in chunks for ch in c.choices)
    assert (reasoning, streamed) == ("weigh it", "Answer")
    events = anthropic_events(env, {"model": "m", "max_tokens": 60, "messages": msgs, "tools": ANTHROPIC_TOOLS})
    texts = [d["delta"].get("text", "") + d["delta"].get("thinking", "") for n, d in events if n == "content_block_delta"]
    assert "<" not in "".join(texts)


def test_role_tokens_end_the_turn_and_never_leak(env: Env) -> None:
    # As the special token id: generation stops there (an end-of-turn id of the checkpoint).
    env.scripts.add("role_id", "Hello", "<|user|>", "and the model goes on", end=None)
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:role_id"), max_tokens=100)
    assert r.choices[0].message.content == "Hello" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(env.scripts.ids("Hello")) + 1
    # Spelled as plain text over several tokens: cut there too, and generation stops.
    env.scripts.add("role_text", "Hello", "<|", "user", "|>", " more text " * 5, end=None, repeat_last=True)
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:role_text"), max_tokens=200)
    assert r.choices[0].message.content == "Hello" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 20
    m = env.anthropic().messages.create(model="m", max_tokens=200, messages=user("SCRIPT:role_text"))
    assert [b.text for b in m.content] == ["Hello"] and m.stop_reason == "end_turn"


def test_template_and_end_of_turn_ids_come_from_the_checkpoint(env: Env) -> None:
    # The prompt is the checkpoint's own chat template (no generic fallback), and its <|observation|>
    # end-of-turn id stops a generation that would otherwise run to max_tokens.
    env.scripts.add("obs", "ok", "<|observation|>", "never shown", end=None, repeat_last=True)
    msgs = [{"role": "system", "content": "be brief"}, *user("SCRIPT:obs")]
    r = env.openai().chat.completions.create(model="m", messages=msgs, max_tokens=500)
    assert r.usage.prompt_tokens == env.prompt_tokens(msgs)
    assert r.choices[0].message.content == "ok"
    assert r.usage.completion_tokens == len(env.scripts.ids("ok")) + 1


def test_empty_think_block_yields_no_reasoning_and_no_thinking_block(env: Env) -> None:
    env.scripts.add("emptythink", "<think></think>Just the answer.")
    msgs = user("SCRIPT:emptythink")
    r = env.openai().chat.completions.create(model="m", messages=msgs)
    msg = r.choices[0].message
    assert msg.content == "Just the answer." and not getattr(msg, "reasoning_content", None)
    assert "reasoning_content" not in msg.model_dump(exclude_none=True)
    lines = sse_lines(env, "/v1/chat/completions", {"messages": msgs, "stream": True})
    assert not any("reasoning_content" in line for line in lines)
    m = env.anthropic().messages.create(model="m", max_tokens=50, messages=msgs)
    assert [b.type for b in m.content] == ["text"]
    events = anthropic_events(env, {"model": "m", "max_tokens": 50, "messages": msgs})
    blocks = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert blocks == ["text"]


def test_glm47_opening_think_tag_in_prompt_and_compact_tool_calls(env47: Env) -> None:
    # GLM-4.7 opens <think> in the prompt: the reply starts inside thinking without the tag.
    env47.scripts.add(
        "g47",
        "plan quietly</think>Calling.<tool_call>read_file<arg_key>path</arg_key><arg_value>a.py</arg_value></tool_call>",
        end="<|observation|>",
    )
    r = env47.openai().chat.completions.create(model="m", messages=user("SCRIPT:g47"), tools=TOOLS)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == ("plan quietly", "Calling.")
    assert json.loads(msg.tool_calls[0].function.arguments) == {"path": "a.py"}
    with env47.anthropic().messages.stream(model="m", max_tokens=80, messages=user("SCRIPT:g47"), tools=ANTHROPIC_TOOLS) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "plan quietly" and final.content[2].input == {"path": "a.py"}
    # Thinking off: the prompt closes the think block, and what the model writes is content.
    env47.scripts.add("g47off", "No thinking here.")
    msgs = user("SCRIPT:g47off")
    r = env47.openai().chat.completions.create(
        model="m", messages=msgs, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert r.choices[0].message.content == "No thinking here."
    assert r.usage.prompt_tokens == env47.prompt_tokens(msgs, enable_thinking=False)


def test_preserved_thinking_keeps_earlier_reasoning_on_request_or_by_flag(env47: Env, tiny_dir: Path) -> None:
    # GLM-4.7 / 5.x drop the reasoning of turns before the last user message unless clear_thinking is false.
    msgs = [*user("first"), {"role": "assistant", "content": "A.", "reasoning_content": "the first plan, kept or not"}, *user("second")]
    cleared = env47.model.render_chat(msgs)
    kept = env47.model.render_chat(msgs, clear_thinking=False)
    assert "the first plan" not in cleared and "the first plan" in kept
    client = env47.openai()
    default = client.chat.completions.create(model="m", messages=msgs, max_tokens=1)
    assert default.usage.prompt_tokens == len(env47.model.tokenizer.encode(cleared))
    for extra in ({"chat_template_kwargs": {"clear_thinking": False}}, {"thinking": {"type": "enabled", "clear_thinking": False}}):
        r = client.chat.completions.create(model="m", messages=msgs, max_tokens=1, extra_body=extra)
        assert r.usage.prompt_tokens == len(env47.model.tokenizer.encode(kept)), extra
    with _serve(env47.model, clear_thinking=False) as keeping:  # `localglm serve --keep-thinking`
        r = keeping.anthropic().messages.create(
            model="m", max_tokens=1, messages=[*user("first"), {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "the first plan, kept or not", "signature": ""}, {"type": "text", "text": "A."}]}, *user("second")],
        )  # fmt: skip
        assert r.usage.input_tokens + r.usage.cache_read_input_tokens == len(env47.model.tokenizer.encode(kept))
        r = keeping.openai().chat.completions.create(model="m", messages=msgs, max_tokens=1, extra_body={"chat_template_kwargs": {"clear_thinking": True}})
        assert r.usage.prompt_tokens == len(env47.model.tokenizer.encode(cleared))  # the request's choice wins


def test_thinking_can_be_turned_off_per_request(env: Env) -> None:
    env.scripts.add("think_off", "Fine.")
    msgs = user("SCRIPT:think_off")
    on = env.prompt_tokens(msgs)
    off = env.prompt_tokens(msgs, enable_thinking=False)
    assert off > on  # GLM-4.5 adds /nothink and an empty think block
    client = env.openai()
    for extra in (
        {"chat_template_kwargs": {"enable_thinking": False}},
        {"thinking": {"type": "disabled"}},
        {"reasoning_effort": "none"},
    ):
        r = client.chat.completions.create(model="m", messages=msgs, extra_body=extra)
        assert r.usage.prompt_tokens == off, extra
    assert client.chat.completions.create(model="m", messages=msgs).usage.prompt_tokens == on
    m = env.anthropic().messages.create(model="m", max_tokens=20, messages=msgs, thinking={"type": "disabled"})
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == off
    m = env.anthropic().messages.create(model="m", max_tokens=20, messages=msgs, thinking={"type": "enabled", "budget_tokens": 1024})
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == on


def test_server_no_think_default(tiny_dir: Path) -> None:
    with _serve(localglm.load(tiny_dir), enable_thinking=False) as env:
        msgs = user("hello")
        r = env.openai().chat.completions.create(model="m", messages=msgs, max_tokens=1)
        assert r.usage.prompt_tokens == env.prompt_tokens(msgs, enable_thinking=False)
        r = env.openai().chat.completions.create(
            model="m", messages=msgs, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": True}}
        )
        assert r.usage.prompt_tokens == env.prompt_tokens(msgs, enable_thinking=True)


# ---- Anthropic ------------------------------------------------------------------------------------
def test_anthropic_messages_non_streaming(env: Env) -> None:
    env.scripts.add("a_tool", "<think>need the file</think>Reading it." + READ_CALL_45, end="<|observation|>")
    system = [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "open a.py SCRIPT:a_tool"}]}]
    m = env.anthropic().messages.create(model="claude-x", max_tokens=200, system=system, messages=msgs, tools=ANTHROPIC_TOOLS)
    assert m.type == "message" and m.role == "assistant" and m.model == "claude-x" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
    thinking, text, tool = m.content
    assert thinking.thinking == "need the file" and text.text == "Reading it."
    assert tool.name == "read_file" and tool.input == {"path": "src/a b.py", "limit": 20} and tool.id.startswith("toolu_")
    assert m.stop_reason == "tool_use" and m.stop_sequence is None
    glm_msgs = [{"role": "system", "content": "You are a coding agent."}, *user("open a.py SCRIPT:a_tool")]
    expected = env.prompt_tokens(glm_msgs, tools=TOOLS)  # the same tools, in the form the template renders
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == expected
    assert m.usage.output_tokens > 0

    # The tool result turn, as Claude Code sends it (thinking block with its signature resent).
    env.scripts.add("a_after", "It has 20 lines.")
    msgs2 = msgs + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool.id, "content": [{"type": "text", "text": "x = 1"}]},
            {"type": "text", "text": "SCRIPT:a_after"},
        ]},
    ]  # fmt: skip
    m2 = env.anthropic().messages.create(model="claude-x", max_tokens=200, system=system, messages=msgs2, tools=ANTHROPIC_TOOLS)
    assert [b.text for b in m2.content] == ["It has 20 lines."] and m2.stop_reason == "end_turn"
    assert m2.usage.cache_read_input_tokens >= expected  # the previous prompt was not prefilled again


def test_anthropic_stream_event_sequence(env: Env) -> None:
    env.scripts.add("a_stream", "<think>think hard</think>Here." + READ_CALL_45, end="<|observation|>")
    body = {"model": "m", "max_tokens": 200, "messages": user("SCRIPT:a_stream"), "tools": ANTHROPIC_TOOLS}
    events = anthropic_events(env, body)
    names = [n for n, _ in events if n != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(n == d["type"] for n, d in events)
    starts = [(d["index"], d["content_block"]["type"]) for n, d in events if n == "content_block_start"]
    stops = [d["index"] for n, d in events if n == "content_block_stop"]
    assert starts == [(0, "thinking"), (1, "text"), (2, "tool_use")] and stops == [0, 1, 2]
    kinds = {d["index"]: set() for n, d in events if n == "content_block_delta"}
    for n, d in events:
        if n == "content_block_delta":
            kinds[d["index"]].add(d["delta"]["type"])
    assert kinds == {0: {"thinking_delta"}, 1: {"text_delta"}, 2: {"input_json_delta"}}
    partial = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta" and d["index"] == 2]
    assert len(partial) > 2 and json.loads("".join(partial)) == {"path": "src/a b.py", "limit": 20}
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] > 0
    # The official client assembles the same message from the stream.
    with env.anthropic().messages.stream(model="m", max_tokens=200, messages=user("SCRIPT:a_stream"), tools=ANTHROPIC_TOOLS) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Here." and final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "think hard" and final.content[2].input == {"path": "src/a b.py", "limit": 20}


def test_anthropic_count_tokens(env: Env) -> None:
    msgs = user("count me")
    n = env.anthropic().messages.count_tokens(model="m", messages=msgs, system="sys")
    assert n.input_tokens == env.prompt_tokens([{"role": "system", "content": "sys"}, *msgs])


# ---- errors -------------------------------------------------------------------------------------------
OK_MSGS = user("hi")
BAD_OPENAI = [
    (b"{not json", "not valid JSON", None),
    (b"[1, 2]", "expected a JSON object", None),
    ({}, "messages: this field is required", "messages"),
    ({"messages": "hi"}, "expected an array", "messages"),
    ({"messages": []}, "at least one", "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "content", "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "wizard", "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text only", "messages[0].content[0].type"),
    ({"messages": OK_MSGS, "temperature": "hot"}, "expected a number", "temperature"),
    ({"messages": OK_MSGS, "temperature": 9}, "at most 2", "temperature"),
    ({"messages": OK_MSGS, "top_p": 0}, "greater than 0", "top_p"),
    ({"messages": OK_MSGS, "max_tokens": 0}, "at least 1", "max_tokens"),
    ({"messages": OK_MSGS, "max_tokens": True}, "expected an integer", "max_tokens"),
    ({"messages": OK_MSGS, "stream": "yes"}, "true or false", "stream"),
    ({"messages": OK_MSGS, "stop": [1]}, "expected a string", "stop[0]"),
    ({"messages": OK_MSGS, "n": 2}, "only 1", "n"),
    ({"messages": OK_MSGS, "seed": "x"}, "integer", "seed"),
    ({"messages": OK_MSGS, "tools": [{"type": "function"}]}, "required", "tools[0].function"),
    ({"messages": OK_MSGS, "tools": TOOLS, "tool_choice": "sometimes"}, "sometimes", "tool_choice"),
    ({"messages": OK_MSGS, "tool_choice": "required"}, "needs tools", "tool_choice"),
    ({"messages": OK_MSGS, "chat_template_kwargs": {"enable_thinking": "no"}}, "true or false", "chat_template_kwargs.enable_thinking"),
    (
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
        "not valid JSON", "messages[0].tool_calls[0].function.arguments",
    ),
]  # fmt: skip


@pytest.mark.parametrize("body,text,param", BAD_OPENAI, ids=[str(i) for i in range(len(BAD_OPENAI))])
def test_openai_bad_requests_are_400_json_naming_the_field(env: Env, body: Any, text: str, param: str | None) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(env.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert text in err["message"] and err["param"] == param


BAD_ANTHROPIC = [
    ({"max_tokens": 5}, "messages: this field is required"),
    ({"messages": OK_MSGS}, "max_tokens: this field is required"),
    ({"messages": OK_MSGS, "max_tokens": "10"}, "max_tokens: expected an integer"),
    ({"messages": [{"role": "system", "content": "x"}], "max_tokens": 5}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}], "max_tokens": 5}, "messages[0].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}], "max_tokens": 5}, "text only"),
    ({"messages": OK_MSGS, "max_tokens": 5, "thinking": {"type": "sometimes"}}, "thinking.type"),
    ({"messages": OK_MSGS, "max_tokens": 5, "system": 7}, "system: expected"),
    ({"messages": OK_MSGS, "max_tokens": 5, "tools": [{"description": "no name"}]}, "tools[0].name"),
    ({"messages": OK_MSGS, "max_tokens": 5, "tool_choice": {"type": "tool", "name": "nope"}}, "no tool named"),
]  # fmt: skip


@pytest.mark.parametrize("body,text", BAD_ANTHROPIC, ids=[str(i) for i in range(len(BAD_ANTHROPIC))])
def test_anthropic_bad_requests_are_400_in_anthropic_shape(env: Env, body: dict, text: str) -> None:
    r = httpx.post(env.url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert text in data["error"]["message"]


def test_official_clients_parse_errors_and_server_stays_healthy(env: Env) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        env.openai().chat.completions.create(model="m", messages=OK_MSGS, temperature=7)
    assert e.value.param == "temperature" and e.value.type == "invalid_request_error" and "temperature" in e.value.message
    with pytest.raises(anthropic.BadRequestError) as a:
        env.anthropic().messages.create(model="m", max_tokens=0, messages=OK_MSGS)
    assert a.value.body["error"]["type"] == "invalid_request_error" and "max_tokens" in a.value.message
    r = httpx.get(env.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    r = httpx.post(env.url + "/v1/nothing", json={}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(env.url + "/v1/messages/nothing", json={}, timeout=10)
    assert r.status_code == 404 and r.json()["type"] == "error"
    with pytest.raises(openai.BadRequestError) as e:
        env.openai().completions.create(model="m", prompt=[10**9])
    assert "vocabulary" in e.value.message and e.value.param == "prompt"
    r = httpx.post(env.url + "/v1/completions", json={"prompt": 5}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert env.health()["status"] == "ok"
    env.scripts.add("alive", "still here")
    assert env.openai().chat.completions.create(model="m", messages=user("SCRIPT:alive")).choices[0].message.content == "still here"


def test_prompt_longer_than_context_is_400(tiny_dir: Path) -> None:
    with _serve(localglm.load(tiny_dir, ctx=48)) as env:
        long = user("word " * 100)
        with pytest.raises(openai.BadRequestError) as e:
            env.openai().chat.completions.create(model="m", messages=long)
        assert e.value.code == "context_length_exceeded" and "--ctx" in e.value.message
        assert "maximum context length is 48 tokens" in e.value.message
        with pytest.raises(anthropic.BadRequestError) as a:
            env.anthropic().messages.create(model="m", max_tokens=5, messages=long)
        assert re.search(r"prompt is too long: \d+ tokens > 48 maximum", a.value.message)
        # count_tokens still counts it; a short prompt still works
        assert env.anthropic().messages.count_tokens(model="m", messages=long).input_tokens > 48
        r = env.openai().chat.completions.create(model="m", messages=user("hi"), max_tokens=100, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.prompt_tokens + r.usage.completion_tokens <= 48


def test_api_key(tiny_dir: Path) -> None:
    with _serve(localglm.load(tiny_dir), api_key="s3cret") as env:
        with pytest.raises(openai.AuthenticationError):
            env.openai(api_key="wrong").models.list()
        with pytest.raises(anthropic.AuthenticationError) as a:
            env.anthropic(api_key="wrong").messages.create(model="m", max_tokens=1, messages=OK_MSGS)
        assert a.value.body["error"]["type"] == "authentication_error"
        assert httpx.get(env.url + "/metrics", timeout=10).status_code == 401
        assert env.health()["status"] == "ok"  # public
        assert env.openai(api_key="s3cret").models.list().data[0].id == "tiny-glm"  # Authorization: Bearer
        m = env.anthropic(api_key="s3cret").messages.create(model="m", max_tokens=1, messages=OK_MSGS)  # x-api-key
        assert m.usage.output_tokens == 1


# ---- queue, cancellation, concurrency ------------------------------------------------------------
def test_full_queue_is_503_with_retry_after(tiny_dir: Path) -> None:
    with _serve(localglm.load(tiny_dir), queue_size=1) as env:
        gate = threading.Event()
        env.scripts.add("gated", "first", gate=gate)
        env.scripts.add("second", "second")
        results: dict[str, str] = {}

        def ask(name: str) -> None:
            r = env.openai().chat.completions.create(model="m", messages=user(f"SCRIPT:{name}"))
            results[name] = r.choices[0].message.content

        t1 = threading.Thread(target=ask, args=("gated",))
        t1.start()
        _wait(lambda: env.health()["busy"])
        t2 = threading.Thread(target=ask, args=("second",))
        t2.start()
        _wait(lambda: env.health()["queue_waiting"] == 1)
        try:
            r = httpx.post(env.url + "/v1/chat/completions", json={"messages": OK_MSGS}, timeout=10)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full" and "--queue-size" in r.json()["error"]["message"]
            r = httpx.post(env.url + "/v1/messages", json={"messages": OK_MSGS, "max_tokens": 5}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
            with pytest.raises(openai.InternalServerError):
                env.openai().chat.completions.create(model="m", messages=OK_MSGS)
        finally:
            gate.set()
        t1.join(30)
        t2.join(30)
        assert results == {"gated": "first", "second": "second"}  # FIFO, both answered
        assert env.metric("requests_rejected_total") == 3


def test_quiet_streams_get_keepalives(tiny_dir: Path) -> None:
    with _serve(localglm.load(tiny_dir), heartbeat_s=0.03) as env:
        env.scripts.add("slow", "a b c", delay_s=0.1)
        lines = sse_lines(env, "/v1/chat/completions", {"messages": user("SCRIPT:slow"), "stream": True})
        assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"
        chunks = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:slow"), stream=True)
        assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == "a b c"
        events = anthropic_events(env, {"model": "m", "max_tokens": 20, "messages": user("SCRIPT:slow")})
        assert [n for n, _ in events].count("ping") > 1
        with env.anthropic().messages.stream(model="m", max_tokens=20, messages=user("SCRIPT:slow")) as s:
            assert "".join(s.text_stream) == "a b c"


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_the_engine(env: Env) -> None:
    env.scripts.add("endless", "tick", end=None, repeat_last=True, delay_s=0.01)
    env.wait_idle()
    before = env.metric('generations_total{finish_reason="cancelled"}', default=0)
    cancelled0 = env.metric("generations_cancelled_total")
    # OpenAI client: read a few chunks, then close the stream.
    stream = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:endless"), stream=True, max_tokens=5000)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    env.wait_idle(timeout=5)
    # Anthropic, raw: drop the connection mid-stream.
    body = {"model": "m", "max_tokens": 5000, "messages": user("SCRIPT:endless"), "stream": True}
    with httpx.stream("POST", env.url + "/v1/messages", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 12:
                break
    env.wait_idle(timeout=5)
    assert env.metric("generations_cancelled_total") == cancelled0 + 2
    assert env.metric('generations_total{finish_reason="cancelled"}') == before + 2
    env.scripts.add("next", "next one")
    r = env.openai().chat.completions.create(model="m", messages=user("SCRIPT:next"))
    assert r.choices[0].message.content == "next one"


def test_disconnect_while_waiting_non_streaming_frees_the_engine(env: Env) -> None:
    env.scripts.add("endless2", "tock", end=None, repeat_last=True, delay_s=0.01)
    env.wait_idle()
    cancelled0 = env.metric("generations_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(env.url + "/v1/chat/completions", json={"messages": user("SCRIPT:endless2"), "max_tokens": 5000}, timeout=0.5)
    env.wait_idle(timeout=5)
    assert env.metric("generations_cancelled_total") == cancelled0 + 1


def test_eight_concurrent_clients_five_requests_each(env: Env) -> None:
    for t in range(8):
        for i in range(5):
            env.scripts.add(f"c{t}_{i}", f"reply {t}-{i} ok")
    errors: list[BaseException] = []
    answers: dict[tuple[int, int], str] = {}

    def client(t: int) -> None:
        oa, an = env.openai(), env.anthropic()
        try:
            for i in range(5):
                msgs = user(f"client {t} request {i} SCRIPT:c{t}_{i}")
                kind = (t + i) % 3
                if kind == 0:
                    text = oa.chat.completions.create(model="m", messages=msgs).choices[0].message.content
                elif kind == 1:
                    chunks = oa.chat.completions.create(model="m", messages=msgs, stream=True)
                    text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
                else:
                    with an.messages.stream(model="m", max_tokens=50, messages=msgs) as s:
                        text = "".join(s.text_stream)
                answers[(t, i)] = text
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert answers == {(t, i): f"reply {t}-{i} ok" for t in range(8) for i in range(5)}
    assert env.health()["status"] == "ok"


# ---- prefix reuse ---------------------------------------------------------------------------------
def test_outputs_with_prefix_reuse_equal_outputs_without(tiny_fp32_dir: Path) -> None:
    """A three-turn agent conversation, greedy: identical replies, and turns 2-3 reuse the cache."""
    results = {}
    for reuse in (True, False):
        with _serve(localglm.load(tiny_fp32_dir), reuse_prefix=reuse) as env:
            client = env.openai()
            msgs: list[dict] = [{"role": "system", "content": "You are a careful coding agent."}]
            replies, cached, prompts = [], [], []
            for turn in ("Write a function that adds two numbers.", "Now add a docstring.", "And a test."):
                msgs.append({"role": "user", "content": turn})
                r = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=12)
                text = r.choices[0].message.content
                replies.append(text)
                cached.append(r.usage.prompt_tokens_details.cached_tokens)
                prompts.append(r.usage.prompt_tokens)
                msgs.append({"role": "assistant", "content": text})
            seeded = [
                client.chat.completions.create(model="m", messages=user("seeded"), temperature=1.0, seed=7, max_tokens=8).choices[0].message.content
                for _ in range(2)
            ]
            results[reuse] = (replies, cached, prompts, seeded)
    (r_on, c_on, p_on, s_on), (r_off, c_off, _, s_off) = results[True], results[False]
    assert r_on == r_off
    assert s_on[0] == s_on[1] == s_off[0] == s_off[1]  # a seed reproduces a sampled reply
    assert c_off == [0, 0, 0]
    assert c_on[1] >= p_on[0] and c_on[2] >= p_on[1]  # each turn reuses at least the previous prompt


def test_metrics_prometheus_text(env: Env) -> None:
    env.openai().chat.completions.create(model="m", messages=user("metrics"), max_tokens=2)
    text = httpx.get(env.url + "/metrics", timeout=10).text
    sample = re.compile(r'^localglm_[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+$|^# (HELP|TYPE) localglm_\w+ .+$')
    bad = [line for line in text.splitlines() if not sample.match(line)]
    assert not bad, bad
    assert env.metric("prompt_tokens_total") > 0 and env.metric("generated_tokens_total") > 0
    assert env.metric("prompt_tokens_cached_total") > 0
    assert env.metric("context_tokens") == env.model.ctx
    assert env.metric("last_decode_tokens_per_second") >= 0
    assert 'localglm_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'localglm_requests_total{endpoint="/v1/chat/completions",status="400"}' in text
