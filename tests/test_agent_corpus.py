"""The synthetic agent conversations of the default model's corpus: GLM's formats, exactly as localglm
renders and parses them, real docstrings, deterministic, and nothing from held-out modules."""

from __future__ import annotations

import inspect
import json
import random

from localglm.chat.stream_parser import parse_complete
from localglm.training.agent_corpus import (
    TOOL_GET_DOCSTRING,
    TOOL_LIST_FUNCTIONS,
    agent_docs,
    docstring_doc,
    list_doc,
    lookup_pool,
    reasoning_for,
    template,
    thinking_doc,
)
from localglm.training.corpus import Example, is_heldout, stdlib_dir

CODE = '''def total(items, start=0):
    """Return the sum of the items."""
    result = start
    for x in items:
        if x is None:
            raise ValueError("no None")
        result += x
    return result'''


def _assistant_turns(doc: str) -> list[str]:
    """The text of each assistant turn (up to the next role token), as the model generates it."""
    out = []
    for part in doc.split("<|assistant|>")[1:]:
        end = min(i for i in (part.find(t) for t in ("<|user|>", "<|observation|>")) if i >= 0)
        out.append(part[:end])
    return out


def test_docstring_lookup_is_a_parsable_glm_tool_call_with_the_real_docstring() -> None:
    import textwrap

    doc = docstring_doc(template(), "textwrap.dedent", textwrap.dedent, random.Random(0))
    call_turn, answer_turn = _assistant_turns(doc)
    msg = parse_complete(call_turn, tools=[TOOL_GET_DOCSTRING, TOOL_LIST_FUNCTIONS])
    assert msg.thinking.startswith("The user asks about `textwrap.dedent`")
    assert [(c.name, c.arguments) for c in msg.tool_calls] == [("get_docstring", {"name": "textwrap.dedent"})]
    assert "<tool_call>get_docstring\n<arg_key>name</arg_key>\n<arg_value>textwrap.dedent</arg_value>\n</tool_call><|observation|>" in doc
    real = inspect.getdoc(textwrap.dedent)
    response = doc.split("<tool_response>\n", 1)[1].split("\n</tool_response>", 1)[0]
    assert real.startswith(response.removesuffix("\n...")) and response.splitlines()[0] == real.splitlines()[0]
    assert parse_complete(answer_turn).content.startswith("`textwrap.dedent(text)`: Remove any common leading whitespace")
    assert doc.startswith("[gMASK]<sop><|system|>\n# Tools") and doc.endswith("<|user|>")
    tools_block = doc.split("<tools>\n", 1)[1].split("</tools>", 1)[0]
    assert json.loads(tools_block.splitlines()[0])["function"]["name"] in ("get_docstring", "list_functions")


def test_list_functions_call_and_answer() -> None:
    pool = lookup_pool(is_heldout, stdlib_dir())
    doc = list_doc(template(), "bisect", pool["bisect"], random.Random(1))
    call_turn, answer_turn = _assistant_turns(doc)
    assert [(c.name, c.arguments) for c in parse_complete(call_turn).tool_calls] == [("list_functions", {"module": "bisect"})]
    assert "\ninsort_left\n" in doc and "`bisect` has" in parse_complete(answer_turn).content


def test_thinking_turn_renders_a_think_block_before_the_code() -> None:
    doc = thinking_doc(template(), "total", "Write a function that returns the sum of the items.", CODE, random.Random(2))
    (turn,) = _assistant_turns(doc)
    msg = parse_complete(turn)
    assert msg.thinking == reasoning_for("total", "Write a function that returns the sum of the items.", CODE)
    assert msg.content == f"```python\n{CODE}\n```" and not msg.tool_calls
    assert turn.startswith("\n<think>The user wants a function that returns the sum of the items.")
    for fact in ("`items`, `start`", "needs a loop", "checks them with if", "raise an exception", "returns the result"):
        assert fact in msg.thinking, fact


def test_agent_docs_are_seeded_and_leave_held_out_modules_alone() -> None:
    ex = [Example("m.py", f"f{i}", f"Write a function that returns {i}.", f"def f{i}():\n    return {i}") for i in range(10)]
    kw = dict(n_think=3, n_docstring=4, n_list=1, n_no_call=2)
    a = agent_docs(ex, is_heldout, stdlib_dir(), seed=5, **kw)
    assert a == agent_docs(ex, is_heldout, stdlib_dir(), seed=5, **kw) and len(a) == 10
    assert a != agent_docs(ex, is_heldout, stdlib_dir(), seed=6, **kw)
    assert sum("<|observation|>" in d for d in a) == 5 and sum("<tools>" in d for d in a) == 7 and sum("<think>The user wants a function" in d for d in a) == 3
    for rows in lookup_pool(is_heldout, stdlib_dir()).values():
        for _, fn in rows:
            try:
                src = inspect.getsourcefile(fn)
            except TypeError:
                continue
            if src and src.startswith(str(stdlib_dir())):
                assert not is_heldout(str(src)[len(str(stdlib_dir())) + 1 :])
