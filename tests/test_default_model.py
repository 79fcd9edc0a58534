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


def test_thinks_before_answering_when_asked_to_reason(model) -> None:
    messages = [{"role": "user", "content": "Think step by step. Write a function that checks whether a string is a palindrome."}]
    done = [e for e in model.generate(messages=messages, max_new_tokens=300, temperature=0)][-1]
    parsed = parse_complete(done.text)
    assert done.text.startswith("\n<think>The user wants a function that"), done.text[:80]
    assert len(parsed.thinking.split()) >= 10 and "```python" in parsed.content and "def " in parsed.content

