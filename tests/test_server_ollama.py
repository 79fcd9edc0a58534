"""Ollama's API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version) end to end through the
official `ollama` client: what editors whose local-model setting speaks Ollama send. A real server on a loopback
port, a real tiny model, its output forced token by token (`ScriptedOutput`) so GLM's thinking and tool-call
parsing runs through the whole stack."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pydantic
import pytest
import torch

import localglm
from localglm.server import ServerSettings, create_app
from localglm.server.testing import READ_FILE_CALL, ScriptedOutput, ServerThread, scripted_server

TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["path"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}}},
]  # fmt: skip
READ_CALL = READ_FILE_CALL


class Env:
    def __init__(self, model: localglm.Model, scripts: ScriptedOutput, srv: ServerThread) -> None:
        self.model, self.scripts, self.srv = model, scripts, srv

    def client(self) -> ollama.Client:
        return ollama.Client(host=self.srv.base_url, timeout=60)

    def prompt_tokens(self, messages: list[dict], tools: list | None = None) -> int:
        return len(self.model.tokenizer.encode(self.model.render_chat(messages, tools=tools)))

    def lines(self, path: str, body: dict) -> list[dict]:
        with httpx.stream("POST", self.srv.base_url + path, json=body, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson"), r.read()
            return [json.loads(line) for line in r.iter_lines()]


@pytest.fixture(scope="module")
def env(tiny_dir: Path) -> Iterator[Env]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = localglm.load(tiny_dir)
    with scripted_server(model) as (scripts, srv):
        yield Env(model, scripts, srv)
    torch.set_num_threads(before)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_whole_reply_with_thinking_and_counts(env: Env) -> None:
    ids = env.scripts.add("basic", "<think>plan it</think>Hello world")
    r = env.client().chat(model="tiny-glm", messages=user("say hi SCRIPT:basic"))
    assert r.message.role == "assistant" and r.message.content == "Hello world" and r.message.thinking == "plan it"
    assert r.done and r.done_reason == "stop" and r.model == "tiny-glm"
    assert r.prompt_eval_count == env.prompt_tokens(user("say hi SCRIPT:basic")) and r.eval_count == len(ids)
    assert r.total_duration > 0 and r.eval_duration > 0


def test_chat_streams_by_default_as_ndjson(env: Env) -> None:
    env.scripts.add("stream1", "<think>step one, step two</think>The answer is 42.")
    parts = list(env.client().chat(model="m", messages=user("q SCRIPT:stream1"), stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == "step one, step two"
    assert "".join(p.message.content or "" for p in parts) == "The answer is 42."
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done and parts[-1].done_reason == "stop"
    lines = env.lines("/api/chat", {"model": "m", "messages": user("q SCRIPT:stream1")})  # no "stream": Ollama's default is true
    assert len(lines) > 3 and lines[-1]["done"] is True and lines[-1]["eval_count"] > 0


def test_tool_calls_round_trip(env: Env) -> None:
    env.scripts.add("call1", "<tool_call>get_time\n</tool_call>" + READ_CALL, end="<|observation|>")
    env.scripts.add("after", "The file has 20 lines.")
    client = env.client()
    r = client.chat(model="m", messages=user("read it SCRIPT:call1"), tools=TOOLS)
    calls = r.message.tool_calls
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_time", {}), ("read_file", {"path": "src/a b.py", "limit": 20})]
    streamed = [c for p in client.chat(model="m", messages=user("read it SCRIPT:call1"), tools=TOOLS, stream=True) for c in p.message.tool_calls or []]
    assert [c.function.name for c in streamed] == ["get_time", "read_file"]  # each sent whole, once written
    msgs = user("read it SCRIPT:call1") + [
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump(exclude_none=True) for c in calls]},
        {"role": "tool", "content": "now", "tool_name": "get_time"},
        {"role": "tool", "content": "line 1\nline 2 SCRIPT:after", "tool_name": "read_file"},
    ]
    r2 = client.chat(model="m", messages=msgs, tools=TOOLS)
    assert r2.message.content == "The file has 20 lines."


def test_think_switch_format_and_options(env: Env) -> None:
    client = env.client()
    off = client.chat(model="m", messages=user("hi"), think=False, options={"num_predict": 1, "temperature": 0})
    on = client.chat(model="m", messages=user("hi"), think=True, options={"num_predict": 1, "temperature": 0})
    assert off.prompt_eval_count != on.prompt_eval_count  # the template opened / closed the thinking block in the prompt
    env.scripts.add("long", "alpha beta gamma delta")
    r = client.chat(model="m", messages=user("SCRIPT:long"), options={"num_predict": 2})
    assert r.done_reason == "length" and r.eval_count == 2
    r = client.chat(model="m", messages=user("SCRIPT:long"), options={"stop": ["gamma"]})
    assert r.message.content.strip() == "alpha beta"

    class City(pydantic.BaseModel):
        name: str
        population: int

    r = client.chat(model="m", messages=user("a city as JSON"), format=City.model_json_schema(), options={"num_predict": 120, "temperature": 0})
    City.model_validate_json(r.message.content)
    r = client.chat(model="m", messages=user("JSON please"), format="json", options={"num_predict": 60, "temperature": 0}, think=False)
    assert isinstance(json.loads(r.message.content), (dict, list))


def test_generate_chat_templated_and_raw(env: Env) -> None:
    env.scripts.add("gen", "<think>hmm</think>Paris.")
    r = env.client().generate(model="m", prompt="Capital of France? SCRIPT:gen", system="be brief")
    assert r.response == "Paris." and r.thinking == "hmm" and r.done
    assert r.prompt_eval_count == env.prompt_tokens([{"role": "system", "content": "be brief"}, *user("Capital of France? SCRIPT:gen")])
    env.scripts.add("raw", " = 42\n")
    parts = list(env.client().generate(model="m", prompt="answer SCRIPT:raw", raw=True, stream=True))
    assert "".join(p.response for p in parts) == " = 42\n" and parts[-1].prompt_eval_count == len(env.model.tokenizer.encode("answer SCRIPT:raw"))
    loaded = env.client().generate(model="m", prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert env.client().chat(model="m", messages=[], keep_alive=0).done_reason == "unload"


def test_model_listing_show_ps_and_version(env: Env) -> None:
    client = env.client()
    (listed,) = client.list().models
    assert listed.model == "tiny-glm" and listed.details.family == env.model.config.model_type and listed.size > 0
    shown = client.show("tiny-glm")
    arch = env.model.config.model_type
    assert shown.modelinfo["general.architecture"] == arch and shown.modelinfo[f"{arch}.context_length"] == env.model.ctx
    assert {"completion", "tools", "thinking"} <= set(shown.capabilities) and "<|assistant|>" in shown.template
    (running,) = client.ps().models
    assert running.context_length == env.model.ctx
    assert httpx.get(env.srv.base_url + "/api/version", timeout=10).json()["version"].count(".") == 2


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/api/chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "messages[0].images"),
        ("/api/chat", {"messages": user("x"), "think": "max"}, "think"),
        ("/api/chat", {"messages": user("x"), "format": 5}, "format"),
        ("/api/chat", {"messages": user("x"), "options": {"temperature": "hot"}}, "options.temperature"),
        ("/api/chat", {"messages": user("x"), "options": {"num_predict": 0}}, "options.num_predict"),
        ("/api/chat", {"messages": user("x"), "options": {"stop": 5}}, "options.stop"),
        ("/api/chat", {"messages": user("x"), "options": {"stop": ["a", 5]}}, "options.stop[1]"),
        ("/api/chat", {"messages": user("x"), "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ("/api/generate", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/api/generate", {"prompt": "x", "context": [1, 2]}, "context"),
        ("/api/show", {}, "model"),
    ],
)
def test_bad_requests_are_400_in_ollamas_error_shape(env: Env, path: str, body: dict, field: str) -> None:
    r = httpx.post(env.srv.base_url + path, json=body, timeout=60)
    assert r.status_code == 400 and list(r.json()) == ["error"] and field in r.json()["error"], r.text


def test_the_client_raises_the_servers_message(env: Env) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        env.client().chat(model="m", messages=user("x"), think="max")
    assert e.value.status_code == 400 and e.value.error.startswith("think:")


def test_a_failed_generation_ends_the_stream_with_an_error_line(env: Env) -> None:
    def broken(endpoint: str, body: dict) -> Any:
        return lambda generated, logits: logits * float("nan")

    app = create_app(env.model, ServerSettings(model_name="m"), logits_processor_hook=broken)
    with ServerThread(app) as srv:
        client = ollama.Client(host=srv.base_url, timeout=60)
        with pytest.raises(ollama.ResponseError, match="NaN") as e:
            client.chat(model="m", messages=user("hi"), stream=False)
        assert e.value.status_code == 422
        with pytest.raises(ollama.ResponseError, match="NaN"):
            list(client.chat(model="m", messages=user("hi"), stream=True))
