"""The OpenAI Responses API (/v1/responses) end to end, through the official `openai` client: what Codex
CLI and the newer OpenAI SDK agents send. A real server on a loopback port, a real tiny model; the
model's output is forced token by token (`ScriptedOutput`) so GLM's thinking and tool-call parsing
runs through the whole stack, and the client's own stream accumulator (`responses.stream`) checks
the event sequence."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
import torch

import localglm
from localglm.server import ServerSettings, create_app
from localglm.server.testing import READ_FILE_CALL, ScriptedOutput, ServerThread, scripted_server

TOOLS = [
    {
        "type": "function",
        "name": "read_file",
        "description": "Read a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["path"]},
    },
    {"type": "function", "name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}},
]
READ_CALL = READ_FILE_CALL


class Env:
    def __init__(self, model: localglm.Model, scripts: ScriptedOutput, srv: ServerThread) -> None:
        self.model, self.scripts, self.srv = model, scripts, srv

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.srv.base_url + "/v1", api_key="none", max_retries=0, timeout=60)

    def prompt_tokens(self, messages: list[dict], tools: list | None = None) -> int:
        return len(self.model.tokenizer.encode(self.model.render_chat(messages, tools=tools)))

    def post(self, body: Any, path: str = "/v1/responses") -> httpx.Response:
        return httpx.post(self.srv.base_url + path, json=body, timeout=60)

    def events(self, body: dict) -> list[tuple[str, dict]]:
        with httpx.stream("POST", self.srv.base_url + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200, r.read()
            out, name = [], None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    out.append((name, json.loads(line[6:])))
            return out


@pytest.fixture(scope="module")
def env(tiny_dir: Path) -> Iterator[Env]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only fights for the 2 cores
    model = localglm.load(tiny_dir)
    with scripted_server(model) as (scripts, srv):
        yield Env(model, scripts, srv)
    torch.set_num_threads(before)


def test_text_reply_with_reasoning_items_and_usage(env: Env) -> None:
    ids = env.scripts.add("basic", "<think>plan it</think>Hello world")
    r = env.client().responses.create(model="tiny-glm", input="say hi SCRIPT:basic", instructions="be brief")
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "plan it"
    assert r.output_text == "Hello world"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hi SCRIPT:basic"}]
    assert r.usage.input_tokens == env.prompt_tokens(msgs)
    assert r.usage.output_tokens == len(ids) and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    assert r.instructions == "be brief" and r.model == "tiny-glm"


def test_stream_events_accumulate_in_the_official_client(env: Env) -> None:
    env.scripts.add("stream1", "<think>step one, step two</think>The answer is 42.")
    with env.client().responses.stream(model="m", input=[{"role": "user", "content": "q SCRIPT:stream1"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.reasoning_text.delta") > 1 and kinds.count("response.output_text.delta") > 1
    assert final.output_text == "The answer is 42." and final.output[0].content[0].text == "step one, step two"
    events = env.events({"input": "q SCRIPT:stream1"})
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    assert all(name == data["type"] for name, data in events)
    done = [d["item"] for n, d in events if n == "response.output_item.done"]
    assert done == events[-1][1]["response"]["output"]  # the final response holds the items as they were finished


def test_function_call_round_trip_by_items_and_by_previous_response_id(env: Env) -> None:
    env.scripts.add("call1", READ_CALL, end="<|observation|>")
    env.scripts.add("after", "The file has 20 lines.")
    client = env.client()
    first = client.responses.create(model="m", input="read it SCRIPT:call1", tools=TOOLS)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "read_file" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"path": "src/a b.py", "limit": 20}
    # Codex's way: the whole conversation as items every turn (store false).
    items = [{"role": "user", "content": "read it SCRIPT:call1"}, call.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": "line 1\nline 2 SCRIPT:after"}]
    second = client.responses.create(model="m", input=items, tools=TOOLS, store=False)
    assert second.output_text == "The file has 20 lines."
    chat = [{"role": "user", "content": "read it SCRIPT:call1"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id, "type": "function",
                                                                 "function": {"name": "read_file", "arguments": {"path": "src/a b.py", "limit": 20}}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "line 1\nline 2 SCRIPT:after"}]
    chat_tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}} for t in TOOLS]
    assert second.usage.input_tokens == env.prompt_tokens(chat, tools=chat_tools)
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens  # the prefix came from the KV cache
    # The SDK's other way: only the new item, chained to the stored first response; the same prompt.
    third = client.responses.create(model="m", previous_response_id=first.id, tools=TOOLS,
                                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "line 1\nline 2 SCRIPT:after"}])
    assert third.output_text == "The file has 20 lines." and third.usage.input_tokens == second.usage.input_tokens
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="m", previous_response_id=second.id, input="more")  # store false: not kept
    assert client.responses.retrieve(first.id).output[0].call_id == call.call_id
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_streamed_function_call_arguments(env: Env) -> None:
    code = 'def f():\n    return "x"\n'
    env.scripts.add("call_nl", f"Let me look.<tool_call>read_file\n<arg_key>path</arg_key>\n<arg_value>{code}</arg_value>\n</tool_call>",
                    end="<|observation|>")  # fmt: skip
    with env.client().responses.stream(model="m", input="SCRIPT:call_nl", tools=TOOLS) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 2  # arguments arrive as they are generated
    message, call = final.output
    assert message.content[0].text == "Let me look." and call.name == "read_file"
    assert json.loads(call.arguments) == json.loads("".join(deltas)) == {"path": code}


def test_parallel_calls_tool_choice_and_allowed_tools(env: Env) -> None:
    env.scripts.add("two", "<tool_call>get_time\n</tool_call>" + READ_CALL, end="<|observation|>")
    client = env.client()
    r = client.responses.create(model="m", input="SCRIPT:two", tools=TOOLS)
    assert [(o.type, o.name) for o in r.output] == [("function_call", "get_time"), ("function_call", "read_file")]
    assert r.output[0].arguments == "{}" and len({o.call_id for o in r.output}) == 2
    r = client.responses.create(model="m", input="SCRIPT:two", tools=TOOLS, parallel_tool_calls=False)
    assert [o.name for o in r.output] == ["get_time"] and r.parallel_tool_calls is False
    r = client.responses.create(model="m", input="SCRIPT:two", tools=TOOLS, tool_choice="none")
    assert [o.type for o in r.output] == ["message"]
    one = client.responses.create(model="m", input="x", tools=TOOLS, max_output_tokens=1,
                                  tool_choice={"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_time"}]})
    chat_tool = [{"type": "function", "function": {k: TOOLS[1][k] for k in ("name", "description", "parameters")}}]
    assert one.usage.input_tokens == env.prompt_tokens([{"role": "user", "content": "x"}], tools=chat_tool)


def test_custom_tools_take_free_text_input(env: Env) -> None:
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"
    env.scripts.add("patch", f"<tool_call>apply_patch\n<arg_key>input</arg_key>\n<arg_value>{patch}</arg_value>\n</tool_call>",
                    end="<|observation|>")  # fmt: skip
    tools = [{"type": "custom", "name": "apply_patch", "description": "Apply a patch"}, {"type": "web_search"}]
    r = env.client().responses.create(model="m", input="SCRIPT:patch", tools=tools)
    (call,) = r.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and call.input == patch
    events = env.events({"input": "SCRIPT:patch", "tools": tools})
    assert [d["input"] for n, d in events if n == "response.custom_tool_call_input.done"] == [patch]
    # the call and its output go back as items
    items = [{"role": "user", "content": "SCRIPT:patch"}, call.model_dump(exclude_none=True),
             {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"}]
    env.scripts.add("ok", "Patched.")
    items[-1]["output"] = "Done! SCRIPT:ok"
    assert env.client().responses.create(model="m", input=items, tools=tools).output_text == "Patched."


def test_max_output_tokens_is_incomplete(env: Env) -> None:
    env.scripts.add("long", "alpha beta gamma delta epsilon")
    r = env.client().responses.create(model="m", input="SCRIPT:long", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 2
    events = env.events({"input": "SCRIPT:long", "max_output_tokens": 2})
    assert events[-1][0] == "response.incomplete"


def test_json_schema_output_parses(env: Env) -> None:
    class Answer(pydantic.BaseModel):
        city: str
        population: int

    r = env.client().responses.parse(model="m", input="Give a city as JSON", text_format=Answer, max_output_tokens=120, temperature=0)
    assert isinstance(r.output_parsed, Answer)


def test_input_tokens_count_matches_the_generation(env: Env) -> None:
    count = env.client().responses.input_tokens.count(model="m", input="how many tokens?", instructions="be brief", tools=TOOLS)
    r = env.client().responses.create(model="m", input="how many tokens?", instructions="be brief", tools=TOOLS, max_output_tokens=1)
    assert count.input_tokens == r.usage.input_tokens and count.object == "response.input_tokens"


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "input"),
        ({"input": 5}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call", "name": "f", "call_id": "c", "arguments": "{bad"}]}, "input[0].arguments"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ({"input": "x", "reasoning": {"effort": "max"}}, "reasoning.effort"),
        ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format.schema"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "previous_response_id": "resp_missing"}, "previous_response_id"),
        ({"input": "x", "background": True}, "background"),
    ],
)
def test_bad_requests_are_400_naming_the_field(env: Env, body: dict, param: str) -> None:
    r = env.post(body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param.split("[")[0].split(".")[0] in err["message"]


def test_context_overflow_names_input(env: Env) -> None:
    r = env.post({"input": "word " * (env.model.ctx + 10)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "input"


def test_a_failed_generation_is_a_422_or_a_failed_stream(env: Env) -> None:
    def broken(endpoint: str, body: dict) -> Any:
        return lambda generated, logits: logits * float("nan")  # what a corrupt checkpoint gives

    app = create_app(env.model, ServerSettings(model_name="m"), logits_processor_hook=broken)
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.UnprocessableEntityError, match="NaN"):
            client.responses.create(model="m", input="hi", max_output_tokens=2)
        events = [e.type for e in client.responses.create(model="m", input="hi", max_output_tokens=2, stream=True)]
        assert events[:2] == ["response.created", "response.in_progress"] and events[-2:] == ["error", "response.failed"]
        assert httpx.get(srv.base_url + "/health", timeout=10).json()["status"] == "ok"


CODEX_TOOLS = [
    {"type": "function", "name": "shell", "description": "Runs a shell command", "strict": False,
     "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}, "workdir": {"type": "string"}},
                    "required": ["command"], "additionalProperties": False}},
    {"type": "custom", "name": "apply_patch", "description": "Edit files", "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
    {"type": "web_search"},
]  # fmt: skip


def test_a_codex_turn(env: Env) -> None:
    """The request shape Codex CLI sends (wire_api = "responses", store false, reasoning items carried back)."""
    env.scripts.add("codex1", '<think>list files</think><tool_call>shell\n<arg_key>command</arg_key>\n<arg_value>["ls"]</arg_value>\n</tool_call>',
                    end="<|observation|>")  # fmt: skip
    env.scripts.add("codex2", "There is one file, a.txt.")
    turn = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions>workspace-write</permissions>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context>cwd=/w</environment_context>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "what is here? SCRIPT:codex1"}]},
    ]
    body = {"model": "glm", "instructions": "You are a coding agent.", "input": turn, "tools": CODEX_TOOLS, "tool_choice": "auto",
            "parallel_tool_calls": False, "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
            "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k", "text": {"verbosity": "medium"}}  # fmt: skip
    events = env.events(body)
    final = events[-1][1]["response"]
    assert events[-1][0] == "response.completed" and [o["type"] for o in final["output"]] == ["reasoning", "function_call"]
    reasoning, call = final["output"]
    assert call["name"] == "shell" and json.loads(call["arguments"]) == {"command": ["ls"]}
    # Codex's next request: the same items, the model's items as it keeps them, and the command's output.
    kept = {"type": "reasoning", "id": reasoning["id"], "summary": [], "content": None, "encrypted_content": None}
    follow = turn + [kept, {"type": "function_call", "name": "shell", "arguments": call["arguments"], "call_id": call["call_id"]},
                     {"type": "function_call_output", "call_id": call["call_id"], "output": "a.txt\n SCRIPT:codex2"}]  # fmt: skip
    events = env.events({**body, "input": follow})
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == "There is one file, a.txt."
    assert events[-1][1]["response"]["usage"]["input_tokens_details"]["cached_tokens"] > 0


def test_images_in_a_tool_output_become_a_note_and_in_a_user_turn_a_400(env: Env) -> None:
    """Codex's view_image tool answers with an image part: the conversation must go on (text only)."""
    env.scripts.add("seen", "I cannot see images.")
    output = [{"type": "input_text", "text": "screenshot: SCRIPT:seen"}, {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]
    items = [{"role": "user", "content": "look"}, {"type": "function_call", "name": "view_image", "arguments": "{}", "call_id": "c1"},
             {"type": "function_call_output", "call_id": "c1", "output": output}]  # fmt: skip
    assert env.client().responses.create(model="m", input=items).output_text == "I cannot see images."
    r = env.post({"input": [{"role": "user", "content": output}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].content[1].type"


def test_one_turns_assistant_items_fold_into_one_glm_message(env: Env) -> None:
    items = [{"role": "user", "content": "go"},
             {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "a summary"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
             {"role": "assistant", "content": "Found it."},
             {"type": "function_call", "name": "get_time", "arguments": "{}", "call_id": "c1"},
             {"type": "function_call_output", "call_id": "c1", "output": "noon"}]  # fmt: skip
    count = env.client().responses.input_tokens.count(model="m", input=items, tools=TOOLS).input_tokens
    chat = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "Looking.\n\nFound it.", "reasoning_content": "a summary",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
            {"role": "tool", "content": "noon", "tool_call_id": "c1"}]  # fmt: skip
    tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")}} for t in TOOLS]
    assert count == env.prompt_tokens(chat, tools=tools)
