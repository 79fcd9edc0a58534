"""The default model shipped inside the package: loads offline, chats in Python, stops at the end of its turn."""

from __future__ import annotations

import json
import socket

import pytest

import localglm
from localglm.default_model import DEFAULT_MODEL_DIR, default_model_path
from localglm.engine import Done
from localglm.chat.stream_parser import STOP_TAGS, ContentDelta, parse_complete

SPECIAL_MARKERS = ("<|", "[gMASK]", "<sop>", "<think>", "</think>", "<tool_call>")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    """Load with sockets disabled and no Hugging Face cache: everything must come from the package."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("no-hf-home")))

    def no_network(*_a, **_k):
        raise OSError("network disabled in this test")

    mp.setattr(socket.socket, "connect", no_network)
    try:
        yield localglm.load(default_model_path())
    finally:
        mp.undo()


def test_packaged_files_are_complete_and_small() -> None:
    path = default_model_path()
    assert path == DEFAULT_MODEL_DIR
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= names
    assert sum(p.stat().st_size for p in path.iterdir() if p.is_file()) <= 25_000_000  # issue 16's budget, MTP block included
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "glm4_moe" and cfg["n_routed_experts"] >= 16 and cfg["n_shared_experts"] == 1
    assert cfg["num_nextn_predict_layers"] == 1


def test_generates_plain_text(model) -> None:
    text = model.generate_text("def add(a, b):\n", max_new_tokens=8, temperature=0)
    assert isinstance(text, str) and text


# A toy model: plain greedy decoding loops (see README); greedy with a repetition penalty and the
# checkpoint's own sampling settings end their turn.
CASES = {
    "greedy": ("Write a function that checks whether a string is a palindrome.", dict(temperature=0, repetition_penalty=1.3)),
    "sampled": ("Write a function that returns the sum of a list of numbers.", dict(temperature=0.6, top_p=0.95, seed=1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chat_reply_parses_and_stops(model, case) -> None:
    prompt, sampling = CASES[case]
    messages = [{"role": "user", "content": prompt}]
    events = list(model.generate(messages=messages, max_new_tokens=300, **sampling))
    done = events[-1]
    assert isinstance(done, Done)
    assert done.finish_reason == "stop", done.text
    parsed = parse_complete(done.text, start_in_thinking=False)
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert parsed.content.strip() == content.strip()
    assert parsed.content.strip() and not parsed.tool_calls
    for marker in SPECIAL_MARKERS + STOP_TAGS:
        assert marker not in parsed.content
    assert "def " in parsed.content or "return" in parsed.content


def test_cli_generate_defaults_to_packaged_model(capsys) -> None:
    from localglm.cli import main

    assert main(["generate", "-p", "import os\n", "-n", "4", "--temperature", "0", "-q"]) == 0
    err = capsys.readouterr().err  # the stats line goes to stderr; stdout holds only the completion
    assert err.strip().splitlines()[-1].startswith("[")


def test_mtp_head_drafts_tokens_the_model_accepts(model) -> None:
    """The packaged MTP layer was trained (a next-next-token loss): at a fixed depth its greedy drafts
    are mostly accepted, and speculation leaves the greedy reply unchanged."""
    spec = model.speculation
    assert spec is not None and spec.head.layer == model.config.num_hidden_layers
    messages = [{"role": "user", "content": "Write a function that returns the sum of a list of numbers."}]
    saved = spec.policy.max_depth, spec.policy.fixed
    try:
        spec.set_draft(0, adaptive=False)
        plain = [e for e in model.generate(messages=messages, max_new_tokens=48, temperature=0)][-1]
        spec.set_draft(2, adaptive=False)
        drafted = [e for e in model.generate(messages=messages, max_new_tokens=48, temperature=0)][-1]
    finally:
        spec.policy.max_depth, spec.policy.fixed = saved
    assert drafted.token_ids == plain.token_ids
    st = drafted.stats
    assert st.draft_tokens >= 20 and st.accepted_tokens >= 0.4 * st.draft_tokens, (st.draft_tokens, st.accepted_tokens)
    assert st.acceptance_length > 1.5


REASONING_REQUESTS = (
    "checks whether a string is a palindrome.", "returns the sum of a list of numbers.", "returns the number of lines in a file.",
    "reverses a list.", "returns the largest of three numbers.", "counts the vowels in a string.",
    "removes duplicates from a list.", "returns the factorial of n.", "splits a string on commas.", "returns True if a number is even.",
)  # fmt: skip


def test_thinks_before_answering_when_asked_to_reason(model) -> None:
    """Asked to reason, every reply opens a thinking block as the agent corpus taught it. The toy often
    loses its way inside (3-4 of these 10 close it and answer with code, shipped model and the one before)."""
    answered = 0
    for request in REASONING_REQUESTS:
        messages = [{"role": "user", "content": "Think step by step. Write a function that " + request}]
        done = [e for e in model.generate(messages=messages, max_new_tokens=300, temperature=0)][-1]
        assert done.text.startswith("\n<think>The user wants a function that"), done.text[:80]
        parsed = parse_complete(done.text)
        answered += len(parsed.thinking.split()) >= 10 and "```python" in parsed.content and "def " in parsed.content
    assert answered >= 2, answered



DOCSTRING_TOOL = {
    "type": "function",
    "function": {
        "name": "get_docstring",
        "description": "Return the docstring of a Python standard library function.",
        "parameters": {"type": "object", "properties": {"name": {"type": "string", "description": "dotted name, e.g. textwrap.dedent"}}, "required": ["name"]},
    },
}  # fmt: skip
TOOL_QUESTIONS = ("What does textwrap.dedent do?", "What does os.path.join do?", "What does bisect.insort do?",
                  "What does json.dumps return?", "Explain shutil.copyfile.", "What does heapq.heappush do?")  # fmt: skip


def test_calls_the_docstring_tool_when_given_it(model) -> None:
    """Given a tool as an agent gives it (the chat template's tools section), the model reasons as the agent
    corpus taught it and emits GLM's <tool_call> format, which parses to a call of that tool (its argument
    is not yet useful: the system prompt's placeholder)."""
    calls = 0
    for question in TOOL_QUESTIONS:
        done = [e for e in model.generate(messages=[{"role": "user", "content": question}], tools=[DOCSTRING_TOOL], max_new_tokens=200, temperature=0)][-1]
        parsed = parse_complete(done.text)
        calls += bool(parsed.tool_calls) and all(c.name == "get_docstring" for c in parsed.tool_calls)
    assert calls >= 4, calls
