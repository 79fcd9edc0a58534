"""Constrained decoding (localglm/grammar): JSON schemas, GLM tool calls, drafted tokens, closure, thinking budgets.

Output comes from the tiny random model at temperature 1: nothing but the grammar makes it valid,
so every check here fails without it. `Push` (server/testing.py) is a soft forcer: a large bias
toward scripted tokens, not a hard mask, so a grammar can still refuse what it pushes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

import localglm
from localglm.engine import Done, EncodedChat, Model
from localglm.errors import LocalGLMError
from localglm.chat.stream_parser import ParsedMessage
from localglm.grammar import (
    GrammarError,
    GrammarProcessor,
    OutputSpec,
    ToolGrammar,
    chain,
    output_grammar,
    parse_input_format,
    parse_response_format,
)
from localglm.grammar.build import request_processor
from localglm.server.testing import Push

pytestmark = pytest.mark.usefixtures("one_thread")

# Agents' real tool schemas (trimmed descriptions): nested arrays of objects, enums, optional fields.
AGENT_TOOLS = [
    {"type": "function", "function": {"name": "edit_file", "parameters": {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "edits": {"type": "array", "maxItems": 3, "items": {
                "type": "object",
                "properties": {"old_string": {"type": "string", "maxLength": 12}, "new_string": {"type": "string", "maxLength": 12},
                               "replace_all": {"type": "boolean"}},
                "required": ["old_string", "new_string"], "additionalProperties": False}},
        },
        "required": ["path", "edits"]}}},
    {"type": "function", "function": {"name": "todo_write", "parameters": {
        "type": "object",
        "properties": {"todos": {"type": "array", "maxItems": 2, "items": {
            "type": "object",
            "properties": {"content": {"type": "string", "maxLength": 10},
                           "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
                           "priority": {"type": "string", "enum": ["high", "medium", "low"]}},
            "required": ["content", "status"], "additionalProperties": False}}},
        "required": ["todos"]}}},
    {"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object",
        "properties": {"command": {"type": "string"}, "timeout": {"type": "integer", "minimum": 1, "maximum": 600000}},
        "required": ["command"]}}},
    {"type": "function", "function": {"name": "list_dir", "parameters": {"type": "object", "properties": {}}}},
]  # fmt: skip

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object"},
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}}, "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}, "x": {"type": "number"}}, "required": ["n", "x"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "b", 3, None]}}, "required": ["ok", "kind"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 4}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
     "age": {"type": "integer", "minimum": 0, "maximum": 130}}, "required": ["name", "age"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"],
     "additionalProperties": False}}, "type": "object", "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/pt"},
     "maxItems": 3}}, "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "integer"}, {"type": "null"}]}}, "required": ["v"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 5},
    *[t["function"]["parameters"] for t in AGENT_TOOLS],
]  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Model:
    return localglm.load(tiny_dir, ctx=2048)


def run(model: Model, **kwargs: Any) -> tuple[Done, ParsedMessage]:
    events = list(model.generate(**{"temperature": 1.0, **kwargs}))
    done = events[-1]
    assert isinstance(done, Done)
    return done, ParsedMessage.from_events(events[:-1])


def bounded(schema: Any, most: int = 24) -> Any:
    """The schema with every string that has no maxLength given one. A random model at temperature 1
    closes an unbounded string after a heavy-tailed number of tokens (measured on the agent tools'
    schemas: 112 to over 600), so whether it stops within the test's budget would hang on float
    rounding; bounded, the grammar itself must close it. Outputs are validated against the original."""
    if isinstance(schema, dict):
        out = {k: bounded(v, most) for k, v in schema.items()}
        if out.get("type") == "string" and "maxLength" not in out and "enum" not in out:
            out["maxLength"] = most
        return out
    if isinstance(schema, list):
        return [bounded(v, most) for v in schema]
    return schema


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_schema_output_parses_and_validates(model: Model, index: int) -> None:
    schema = SCHEMAS[index]
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "strict": True, "schema": bounded(schema)}}
    for seed in range(3):
        done, msg = run(model, messages=[{"role": "user", "content": "answer in JSON"}], enable_thinking=False,
                        max_new_tokens=200, seed=seed, response_format=fmt)  # fmt: skip
        assert done.finish_reason == "stop", (seed, done.text)
        jsonschema.validate(json.loads(msg.content), schema)


def test_json_object_mode_on_raw_prompt(model: Model) -> None:
    for seed in range(3):
        done, _ = run(model, prompt="JSON:", max_new_tokens=120, seed=seed, response_format={"type": "json_object"})
        assert done.finish_reason == "stop"
        assert isinstance(json.loads(done.text), dict)


def test_without_the_grammar_the_random_model_is_not_json(model: Model) -> None:
    """The oracle for the tests above: the same requests unconstrained do not give JSON."""
    done, _ = run(model, prompt="JSON:", max_new_tokens=40, seed=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(done.text)


def test_closure_finishes_json_when_tokens_run_low(model: Model) -> None:
    """An unbounded schema (strings of any length) still closes within max_tokens."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "array", "items": {"type": "string"}}},
              "required": ["a", "b"]}  # fmt: skip
    for max_new in (20, 30, 50):
        done, _ = run(model, prompt="x", max_new_tokens=max_new, seed=1,
                      response_format={"type": "json_schema", "json_schema": {"schema": schema}})  # fmt: skip
        assert done.finish_reason == "stop", (max_new, done.text)
        assert len(done.token_ids) < max_new
        jsonschema.validate(json.loads(done.text), schema)


def test_too_few_tokens_to_finish_ends_with_length(model: Model) -> None:
    schema = {"type": "object", "properties": {"long_property_name_one": {"type": "string"}}, "required": ["long_property_name_one"]}
    done, _ = run(model, prompt="x", max_new_tokens=3, seed=0, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    assert done.finish_reason == "length"
    assert done.text.startswith("{")


def test_bad_response_formats_name_the_field() -> None:
    with pytest.raises(GrammarError, match=r"response_format\.type: 'xml'"):
        parse_response_format({"type": "xml"})
    with pytest.raises(GrammarError, match=r"response_format\.json_schema"):
        parse_response_format({"type": "json_schema"})
    assert parse_response_format({"type": "text"}) is None


def test_unsupported_schema_is_a_grammar_error(model: Model) -> None:
    with pytest.raises(GrammarError, match="grammar"):
        model.constrained(prompt_text=None, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}})


# ---- tool calls -----------------------------------------------------------------------------------
def tool_events(model: Model, mode: str, seed: int, *, name: str | None = None, push: str | None = None, **kw: Any) -> tuple[Done, ParsedMessage]:
    chat = model.encode_chat([{"role": "user", "content": "do it"}], tools=AGENT_TOOLS, enable_thinking=False)
    proc = request_processor(model.grammar_vocab, prompt_text=chat.text, tools=AGENT_TOOLS, tool_mode=mode, tool_name=name,
                             max_new_tokens=kw.get("max_new_tokens", 300))  # fmt: skip
    procs = []
    if push is not None:
        procs.append(Push(model.tokenizer.encode(push), model.tokenizer.token_to_id("<|endoftext|>")))
    from localglm.grammar import chain

    return run(model, chat=chat, tools=AGENT_TOOLS, tool_grammar=False, seed=seed, max_new_tokens=kw.get("max_new_tokens", 300),
               logits_processor=chain(*procs, proc))  # fmt: skip


def check_call(call: Any) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in AGENT_TOOLS}
    assert call.name in schemas
    jsonschema.validate(call.arguments, schemas[call.name])


def test_required_forces_a_valid_call(model: Model) -> None:
    for seed in range(4):
        done, msg = tool_events(model, "required", seed)
        assert done.finish_reason == "stop", done.text
        assert msg.tool_calls, done.text
        assert msg.content.strip() == ""
        for call in msg.tool_calls:
            check_call(call)


def test_named_forces_that_tool(model: Model) -> None:
    for seed in range(3):
        _, msg = tool_events(model, "named", seed, name="todo_write")
        assert [c.name for c in msg.tool_calls][:1] == ["todo_write"]
        for call in msg.tool_calls:
            check_call(call)


def test_forced_malformed_calls_are_prevented(model: Model) -> None:
    """A model pushing the breakages peers mis-parse: a missing <arg_value>, a missing <arg_key>,
    an unknown key, a wrongly typed value, an unknown tool. The grammar keeps every call valid."""
    broken = [
        "<tool_call>bash\n<arg_key>command</arg_key>\nls -la</arg_value>\n</tool_call>",
        "<tool_call>bash\ncommand</arg_key>\n<arg_value>ls</arg_value>\n</tool_call>",
        "<tool_call>bash\n<arg_key>cmd</arg_key>\n<arg_value>ls</arg_value>\n</tool_call>",
        "<tool_call>bash\n<arg_key>command</arg_key>\n<arg_value>ls</arg_value>\n<arg_key>timeout</arg_key>\n<arg_value>soon</arg_value>\n</tool_call>",
        "<tool_call>rm_rf\n<arg_key>path</arg_key>\n<arg_value>/</arg_value>\n</tool_call>",
    ]
    for i, text in enumerate(broken):
        done, msg = tool_events(model, "auto", i, push=text)
        for call in msg.tool_calls:
            check_call(call)
        assert "arg_key" not in msg.content and "arg_value" not in msg.content, done.text


def test_pushed_well_formed_call_goes_through(model: Model) -> None:
    """The grammar lets a valid call through token for token (the push is what comes out)."""
    text = "<tool_call>bash\n<arg_key>command</arg_key>\n<arg_value>ls -la</arg_value>\n</tool_call>"
    done, msg = tool_events(model, "auto", 0, push=text)
    assert done.text == text
    assert [(c.name, c.arguments) for c in msg.tool_calls] == [("bash", {"command": "ls -la"})]


def test_tool_choice_none_forbids_calls(model: Model) -> None:
    done, msg = tool_events(model, "none", 0, push="<tool_call>bash\n<arg_key>command</arg_key>\n<arg_value>ls</arg_value>\n</tool_call>")
    assert msg.tool_calls == []
    assert "<tool_call>" not in done.text


def test_tool_grammar_text() -> None:
    """The grammar for one tool under tool_choice required, single call: the name, then the required
    string argument (raw text) and the optional integer (as JSON with its bounds), in schema order."""
    spec = OutputSpec("none", None, ToolGrammar(AGENT_TOOLS[2:3], "required", single=True))
    rules = output_grammar(spec).splitlines()
    assert rules[:6] == [
        "start:  body",
        "body: r4",
        'r1: %json {"type": "integer", "minimum": 1, "maximum": 600000, "x-guidance": {"whitespace_flexible": false, '
        '"item_separator": ", ", "key_separator": ": ", "lenient": true}}',
        'r2: "bash" (NL? <arg_key> "command" </arg_key> NL? <arg_value> STR </arg_value>) '
        '(NL? <arg_key> "timeout" </arg_key> NL? <arg_value> r1 </arg_value>)?',
        "r3: <tool_call> (r2) NL? </tool_call>",
        "r4: r3 WS?",
    ]


# ---- custom tools' input grammars -----------------------------------------------------------------
# A patch grammar in the shape of Codex's apply_patch (Lark, `%import common.LF`), bounded so that the
# random model must finish it within the test's tokens: only the grammar can make its input valid.
PATCH_LARK = """start: begin_patch hunk end_patch
begin_patch: "*** Begin Patch" LF
end_patch: "*** End Patch" LF?
hunk: "*** Add File: " filename LF add_line add_line?
filename: /[a-z]{1,6}\\.txt/
add_line: "+" /[a-z ]{0,8}/ LF
%import common.LF
"""
PATCH_RE = re.compile(r"\*\*\* Begin Patch\n\*\*\* Add File: [a-z]{1,6}\.txt\n(\+[a-z ]{0,8}\n){1,2}\*\*\* End Patch\n?")
CUSTOM_TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}} for name in ("apply_patch", "calc")]  # fmt: skip
CUSTOM_FORMATS = {
    "apply_patch": {"type": "grammar", "syntax": "lark", "definition": PATCH_LARK},
    "calc": {"type": "grammar", "grammar": {"syntax": "regex", "definition": r"(add|sub) [0-9]{1,3}"}},  # chat completions' spelling
}


def custom_calls(model: Model, seed: int, *, mode: str = "required", name: str | None = None, push: str | None = None,
                 tool_grammar: bool = True) -> tuple[Done, ParsedMessage]:  # fmt: skip
    chat = model.encode_chat([{"role": "user", "content": "edit"}], tools=CUSTOM_TOOLS, enable_thinking=False)
    formats = {n: parse_input_format(f, f"tools.{n}.format") for n, f in CUSTOM_FORMATS.items()}
    proc = request_processor(model.grammar_vocab, prompt_text=chat.text, tools=CUSTOM_TOOLS, tool_mode=mode, tool_name=name,
                             tool_grammar=tool_grammar, tool_formats=formats, single_tool_call=True, max_new_tokens=150)  # fmt: skip
    pushed = [Push(model.tokenizer.encode(push), model.tokenizer.token_to_id("<|endoftext|>"))] if push else []
    return run(model, chat=chat, tools=CUSTOM_TOOLS, tool_grammar=False, seed=seed, max_new_tokens=150,
               logits_processor=chain(*pushed, proc))  # fmt: skip


def test_custom_tool_inputs_match_their_grammars(model: Model) -> None:
    """Lark (an apply_patch-shaped grammar) and regex inputs, written by the random model: each call's
    input matches its tool's grammar, with the tool grammar off too (a client's grammar is always held)."""
    for seed, (name, tool_grammar) in enumerate([("apply_patch", True), ("apply_patch", False), ("calc", True), ("calc", False)]):
        done, msg = custom_calls(model, seed, mode="named", name=name, tool_grammar=tool_grammar)
        assert done.finish_reason == "stop", done.text
        ((call_name, args),) = [(c.name, c.arguments) for c in msg.tool_calls]
        assert call_name == name and list(args) == ["input"]
        pattern = PATCH_RE if name == "apply_patch" else re.compile(r"(add|sub) [0-9]{1,3}")
        assert pattern.fullmatch(args["input"]), args


def test_a_pushed_input_that_breaks_the_grammar_is_refused(model: Model) -> None:
    """A model that wants to write a unified diff into apply_patch is held to the patch grammar; a
    valid patch goes through token for token."""
    good = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch\n"
    call = "<tool_call>apply_patch\n<arg_key>input</arg_key>\n<arg_value>{}</arg_value>\n</tool_call>"
    done, msg = custom_calls(model, 0, mode="auto", push=call.format(good))
    assert done.text == call.format(good)
    assert [(c.name, c.arguments) for c in msg.tool_calls] == [("apply_patch", {"input": good})]
    diff = "--- a.txt\n+++ a.txt\n@@ -1 +1 @@\n-x\n+y\n"
    for seed in range(2):
        done, msg = custom_calls(model, seed, mode="auto", push=call.format(diff))
        assert "--- a.txt" not in done.text
        for c in msg.tool_calls:
            pattern = PATCH_RE if c.name == "apply_patch" else re.compile(r"(add|sub) [0-9]{1,3}")
            assert pattern.fullmatch(c.arguments["input"]), done.text


def test_custom_tool_formats_are_read_and_checked() -> None:
    assert parse_input_format(None, "f") is None and parse_input_format({"type": "text"}, "f") is None
    lark = parse_input_format({"type": "grammar", "syntax": "lark", "definition": "start: /x+/"}, "f")
    regex = parse_input_format({"type": "grammar", "grammar": {"syntax": "regex", "definition": "a|b"}}, "f")
    assert (lark.syntax, regex.syntax, regex.definition) == ("lark", "regex", "a|b")
    bad = [
        ({"type": "json"}, "tools[1].format.type"),
        ({"type": "grammar", "syntax": "ebnf", "definition": "x"}, "tools[1].format.syntax"),
        ({"type": "grammar", "syntax": "lark"}, "tools[1].format.definition"),
        ({"type": "grammar", "grammar": {"syntax": "regex", "definition": " "}}, "tools[1].format.grammar.definition"),
        ({"type": "grammar", "grammar": "start: x"}, "tools[1].format.grammar"),
        ({"type": "grammar", "syntax": "lark", "definition": "start: missing_rule"}, "tools[1].format.definition"),
        ({"type": "grammar", "syntax": "regex", "definition": "(?=a)b"}, "tools[1].format.definition"),
        ("lark", "tools[1].format"),
    ]
    for fmt, param in bad:
        with pytest.raises(GrammarError) as err:
            grammar = parse_input_format(fmt, "tools[1].format")
            assert grammar is not None
            grammar.check()  # compiling: request_processor's, in the server's worker thread
        assert err.value.param == param and str(err.value).startswith(param) and "\n" not in str(err.value), fmt
    huge = {"type": "grammar", "syntax": "lark", "definition": "start: " + " | ".join(f'"{i}"' for i in range(20_000))}
    with pytest.raises(GrammarError, match="at most 65,536"):  # compiling 200k alternatives took 32 s
        parse_input_format(huge, "tools[1].format")


@pytest.mark.parametrize(
    ("syntax", "definition", "needle"),
    [
        ("lark", "start: start", "cannot be followed: no text matches"),  # compiles; nothing can follow into its input
        # compiles alone, but its lexer is past llguidance's limit beside the request's own rules: the whole grammar
        # then failed at its first token, a 400 naming nothing (param null)
        ("regex", "a{1000000}", "cannot be followed: lexer error"),
    ],
)
def test_a_custom_grammar_no_text_can_follow_is_refused_before_generating(model: Model, syntax: str, definition: str, needle: str) -> None:
    """The error names the definition, under tool_choice required and auto, and with thinking open."""
    chat = model.encode_chat([{"role": "user", "content": "edit"}], tools=CUSTOM_TOOLS, enable_thinking=False)
    dead = {"apply_patch": parse_input_format({"type": "grammar", "syntax": syntax, "definition": definition}, "tools[0].format")}
    for mode, prompt in [("required", chat.text), ("auto", chat.text), ("auto", chat.text + "<think>")]:
        with pytest.raises(GrammarError) as err:
            request_processor(model.grammar_vocab, prompt_text=prompt, tools=CUSTOM_TOOLS, tool_mode=mode, tool_formats=dead)
        assert err.value.param == "tools[0].format.definition" and needle in str(err.value), str(err.value)
        assert "\n" not in str(err.value)


def test_an_error_inside_the_grammar_while_generating_is_one_line(model: Model) -> None:
    """A grammar that fails only after some tokens (no finite text, past the probe's first mask) stops
    the reply with llguidance's first error line, not its internal state."""
    chat = model.encode_chat([{"role": "user", "content": "edit"}], tools=CUSTOM_TOOLS, enable_thinking=False)
    endless = {"apply_patch": parse_input_format({"type": "grammar", "syntax": "lark", "definition": 'start: a\na: "x" a'}, "tools[0].format")}
    proc = request_processor(model.grammar_vocab, prompt_text=chat.text, tools=CUSTOM_TOOLS, tool_mode="named", tool_name="apply_patch",
                             tool_formats=endless, single_tool_call=True)  # fmt: skip
    assert isinstance(proc, GrammarProcessor)
    ids = model.tokenizer.encode("<tool_call>apply_patch\n<arg_key>input</arg_key>\n<arg_value>")
    with pytest.raises(LocalGLMError) as err:
        for _ in range(100_000):
            ids.append(int(np.flatnonzero(proc.allowed(ids))[0]))
    assert str(err.value).startswith("grammar: the output cannot continue: ") and "\n" not in str(err.value), str(err.value)


# ---- drafted tokens, rollback, prefetch -------------------------------------------------------------
def test_drafts_are_checked_and_history_can_move_back(model: Model) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    vocab = model.grammar_vocab
    proc = request_processor(vocab, prompt_text=None, json_schema=schema)
    assert isinstance(proc, GrammarProcessor)
    good = model.tokenizer.encode('{"n": 12}')
    bad = model.tokenizer.encode('{"m": 1}')
    assert proc.allows([], good) == len(good)
    assert bad[:2] == good[:2]  # '{' '"', then the wrong key
    assert proc.allows([], bad) == 2
    assert proc.veto(good[:2], bad[2]) and not proc.veto(good[:2], good[2])
    logits = torch.zeros(vocab.vocab_size)
    fresh = [GrammarProcessor(vocab, proc.grammar)(good[:k], logits) for k in range(len(good) + 1)]
    # out of order (as speculative verification calls it), through prefetch, and after a refused draft
    for k in [3, 1, 4, 0, 2, len(good), 1]:
        assert torch.equal(proc(good[:k], logits), fresh[k]), k
    proc.on_token(good[:2])
    assert torch.equal(proc(good[:2], logits), fresh[2])
    assert proc.allows(good[:2], bad[2:]) == 0
    assert torch.equal(proc(bad[:3], logits).isfinite(), torch.isin(torch.arange(vocab.vocab_size), torch.tensor(vocab.stop_ids)))
    assert torch.equal(proc(good[:3], logits), fresh[3])


def test_grammar_with_prefix_reuse_gives_the_same_output(model: Model) -> None:
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMAS[5]}}
    msgs = [{"role": "user", "content": "a user record please, in JSON"}]
    first, _ = run(model, messages=msgs, enable_thinking=False, max_new_tokens=100, seed=7, response_format=fmt, reuse_prefix=False)
    again, _ = run(model, messages=msgs, enable_thinking=False, max_new_tokens=100, seed=7, response_format=fmt, reuse_prefix=True)
    assert again.stats.cached_prompt_tokens > 0
    assert again.token_ids == first.token_ids
    jsonschema.validate(json.loads(again.text), SCHEMAS[5])


# ---- thinking budget ------------------------------------------------------------------------------
def test_thinking_budget_closes_the_block(model: Model) -> None:
    """A model that would think forever (pushed to write "a" and never `</think>`) stops at the budget,
    whether it opens `<think>` itself (GLM-4.5's template) or the prompt opened it (GLM-4.7's)."""
    a = model.tokenizer.encode("a")[0]
    open_id, close = model.tokenizer.token_to_id("<think>"), model.tokenizer.token_to_id("</think>")
    base = model.encode_chat([{"role": "user", "content": "hi"}], enable_thinking=True)
    assert not base.text.rstrip().endswith("<think>")
    prompt_opened = EncodedChat(base.text + "<think>", [*base.ids, open_id])
    for chat, script in ((base, [open_id] + [a] * 100), (prompt_opened, [a] * 100)):
        for budget in (0, 5, 17):
            events = list(model.generate(chat=chat, max_new_tokens=budget + 8, temperature=1.0, seed=0,
                                         logits_processor=Push(script, a), thinking_budget=budget))  # fmt: skip
            done = events[-1]
            msg = ParsedMessage.from_events(events[:-1])
            start = 0 if chat is prompt_opened else 1
            assert done.token_ids.index(close) == start + budget, done.text
            assert msg.thinking == "a" * budget
            assert msg.content.startswith("a")  # the answer goes on after </think>
    # without a budget the same model never closes it
    done = list(model.generate(chat=prompt_opened, max_new_tokens=30, temperature=1.0, seed=0, logits_processor=Push([a] * 100, a)))[-1]
    assert close not in done.token_ids


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_json_schema(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from localglm.cli import main

    schema = SCHEMAS[5]
    path = tmp_path / "user.json"
    path.write_text(json.dumps(schema))
    for extra in (["--chat", "--no-think"], []):
        rc = main(["generate", str(tiny_dir), "-p", "a user", *extra, "--json-schema", str(path), "-n", "120", "--seed", "2",
                   "--temperature", "1", "-q", "--threads", "1"])  # fmt: skip
        out = capsys.readouterr().out
        assert rc == 0
        jsonschema.validate(json.loads(out.splitlines()[0]), schema)
    assert main(["generate", str(tiny_dir), "-p", "x", "--json", "-n", "60", "--seed", "0", "-q", "--threads", "1"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out.splitlines()[0]), dict)


def test_cli_json_schema_errors_name_the_file(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from localglm.cli import main

    bad = tmp_path / "bad.json"
    cases = [(tmp_path / "missing.json", "cannot read"), (bad, "is not a JSON file"), (bad, "failed to compile JSON schema")]
    for i, (path, words) in enumerate(cases):
        if i == 1:
            bad.write_text("{")
        if i == 2:
            bad.write_text('{"type": "frobnicate"}')
        assert main(["generate", str(tiny_dir), "-p", "x", "--json-schema", str(path), "-q", "--threads", "1"]) != 0
        err = capsys.readouterr()
        assert str(path) in err.err and words in err.err and "Traceback" not in err.err
        assert err.out == ""


def test_tool_schemas_the_engine_cannot_compile_still_get_a_held_call(model: Model) -> None:
    """Clients' tool schemas are not ours to refuse: unimplemented keywords are ignored, and a regex the
    engine cannot compile (look-ahead) falls back to values typed only by their declared type."""
    tools = [{"type": "function", "function": {"name": "grep", "parameters": {"type": "object", "properties": {
        "globs": {"type": "array", "items": {"type": "string", "pattern": "^(?!/).*$"}},
        "opts": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}}, "required": ["globs", "opts"]}}}]  # fmt: skip
    chat = model.encode_chat([{"role": "user", "content": "find"}], tools=tools, enable_thinking=False)
    proc = request_processor(model.grammar_vocab, prompt_text=chat.text, tools=tools, tool_mode="required", max_new_tokens=120)
    for seed in range(2):
        done, msg = run(model, chat=chat, tools=tools, tool_grammar=False, seed=seed, max_new_tokens=120, logits_processor=proc)
        (call, *_) = msg.tool_calls
        assert call.name == "grep" and isinstance(call.arguments["globs"], list) and isinstance(call.arguments["opts"], dict)
    with pytest.raises(GrammarError, match="failed to compile JSON schema"):  # a response_format is refused (400)
        model.constrained(prompt_text=None, response_format={"type": "json_schema", "json_schema": {"schema": tools[0]["function"]["parameters"]}})


def test_grammar_with_speculative_decoding(tiny_fp32_dir: Path) -> None:
    """With the MTP head drafting, the grammar shapes and vetoes drafts: greedy output is the plain
    loop's, token for token (float32: bf16 rounding differs between a 4-token and a 1-token forward even
    unconstrained), and valid; drafted tokens were checked (some accepted). Closure near max_tokens is a
    function of the history alone, so the out-of-order calls of verification see what the plain loop sees."""
    model = localglm.load(tiny_fp32_dir, ctx=2048)
    spec = getattr(model, "speculation", None)
    if spec is None:
        pytest.skip("this checkout's tiny model has no MTP head (speculative decoding not loaded)")
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMAS[6]}}
    msgs = [{"role": "user", "content": "points"}]
    depth = spec.max_draft
    try:
        spec.set_draft(0)
        plain, _ = run(model, messages=msgs, enable_thinking=False, max_new_tokens=150, response_format=fmt, temperature=0.0)
        spec.set_draft(3, adaptive=False)
        fast, _ = run(model, messages=msgs, enable_thinking=False, max_new_tokens=150, response_format=fmt, temperature=0.0)
    finally:
        spec.set_draft(depth)
    assert fast.token_ids == plain.token_ids
    assert fast.stats.draft_tokens > 0
    jsonschema.validate(json.loads(fast.text), SCHEMAS[6])


def test_closure_refuses_a_token_that_opens_more_than_the_tokens_left_close(model: Model) -> None:
    """After `}` in an array of objects with required keys, `,` lengthens the closure from 2-3 tokens to
    ~17 (seen in the server: a forced call cut by max_tokens mid-item). With too few tokens left for
    one more item, `,` is refused and `]` allowed; with enough, both are allowed."""
    item = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 8}, "status": {"enum": ["pending", "done"]}},
            "required": ["text", "status"], "additionalProperties": False}  # fmt: skip
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": item, "maxItems": 4}}, "required": ["items"],
              "additionalProperties": False}  # fmt: skip
    tok = model.tokenizer
    history = tok.encode('{"items": [{"text": "a", "status": "done"}')
    comma, close = tok.encode(","), tok.encode("]")
    assert len(comma) == len(close) == 1
    logits = torch.zeros(model.config.vocab_size)

    def allowed(left: int) -> tuple[bool, bool]:
        proc = request_processor(model.grammar_vocab, prompt_text=None, json_schema=schema, max_new_tokens=len(history) + left)
        out = proc(history, logits.clone())
        return bool(out[comma[0]] > float("-inf")), bool(out[close[0]] > float("-inf"))

    assert allowed(200) == (True, True)
    closure = request_processor(model.grammar_vocab, prompt_text=None, json_schema=schema, max_new_tokens=len(history) + 20)
    closure._sync(history)
    short = closure._closure_length(90)
    m = closure.matcher.deep_copy()
    assert m.consume_token(comma[0])
    after_comma = closure._closure_length(90, m)
    assert after_comma > 2 * short + 8  # the jump the forcing rule alone did not cover
    left = after_comma + 1  # enough to close now, not enough after `,` (its closure plus the end token)
    assert 2 * short + 8 < left  # not yet in the forced-closing steps
    assert allowed(left) == (False, True)
    assert allowed(after_comma + 3) == (True, True)


def test_free_text_beside_tools_runs_to_the_limit(model: Model) -> None:
    """Before: with tools offered, plain text (where the reply may end at any token) was ended ~8 tokens
    before max_tokens by the closing policy and reported as a natural stop, hiding the truncation from agents.
    Now it runs on (finish "length"), while a closure the policy began still ends with its end-of-sequence."""
    chat = model.encode_chat([{"role": "user", "content": "do it"}], tools=AGENT_TOOLS, enable_thinking=False)
    tok, eos = model.tokenizer, model.tokenizer.token_to_id("<|endoftext|>")
    history = tok.encode("Sure, here is some plain text and nothing else")
    logits = torch.zeros(model.config.vocab_size)
    for left in (1, 2, 5, 9):
        proc = request_processor(model.grammar_vocab, prompt_text=chat.text, tools=AGENT_TOOLS, max_new_tokens=len(history) + left)
        out = proc(history, logits.clone())
        assert int((out > float("-inf")).sum()) > 1, left  # not only the end-of-sequence token
    # JSON: the policy closes the string and the object, then ends (a closed document is not left to pad to the limit)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    history = tok.encode('{"a": "some text')
    ids = list(history)
    proc = request_processor(model.grammar_vocab, prompt_text=None, json_schema=schema, max_new_tokens=len(history) + 6)
    while len(ids) < len(history) + 6:
        nxt = int(proc(ids, logits.clone()).argmax())
        if nxt == eos:
            break
        ids.append(nxt)
    assert nxt == eos and json.loads(tok.decode(ids))["a"].startswith("some text")
