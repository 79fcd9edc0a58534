"""The chat app's plain-Python parts: conversation storage, stats formatting, the heat strip, the CLI entry."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tui.app import code_blocks, is_out_of_memory
from tui.metrics import LiveRate, bucket, fmt_bytes, fmt_rate, fmt_seconds, heat_color, heat_strip
from tui.store import Conversation, ConversationStore, default_data_dir, make_title


# ---- storage -----------------------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform != "linux", reason="XDG_DATA_HOME is the Linux convention")
def test_data_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "localglm" / "conversations"
    assert ConversationStore().root == tmp_path / "xdg" / "localglm" / "conversations"


def test_conversation_roundtrip_and_listing(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "chats")
    assert store.list() == []
    a = Conversation(system="be brief", model="m")
    a.add_user("first question\nwith two lines")
    a.add_assistant("answer", thinking="hmm", finish_reason="stop")
    store.save(a)
    b = Conversation()
    b.add_user("second")
    store.save(b)
    store.save(Conversation())  # no turns: nothing written
    (tmp_path / "chats" / "broken.json").write_text("{not json")
    (tmp_path / "chats" / "other.json").write_text(json.dumps({"messages": [{"role": "wizard", "content": 1}]}))

    listed = store.list()
    assert [s.id for s in listed] == [b.id, a.id]  # newest first, unreadable files skipped
    assert listed[1].title == "first question with two lines" and listed[1].turns == 2

    back = store.load(a.id)
    assert back.messages == a.messages and back.system == "be brief" and back.title == a.title
    assert back.model_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question\nwith two lines"},
        {"role": "assistant", "content": "answer", "reasoning_content": "hmm"},
    ]
    assert not list((tmp_path / "chats").glob(".*.tmp"))  # atomic writes leave no temp files
    store.delete(a.id)
    assert [s.id for s in store.list()] == [b.id]
    with pytest.raises(ValueError):
        store.path_for("../escape")


def test_malformed_saved_chats_are_skipped(tmp_path: Path) -> None:
    """A hand-edited or corrupt file must not crash Ctrl+O (listing) or opening the chat (rendering it)."""
    store = ConversationStore(tmp_path)
    q = {"role": "user", "content": "q"}
    bad = {
        "thinking-int": [q, {"role": "assistant", "content": "a", "reasoning_content": 5}],
        "calls-str": [q, {"role": "assistant", "content": "a", "tool_calls": "zz"}],
        "call-no-name": [q, {"role": "assistant", "content": "a", "tool_calls": [{"x": 1}]}],
        "call-args-list": [q, {"role": "assistant", "content": "a", "tool_calls": [{"name": "f", "arguments": [1]}]}],
        "reason-list": [q, {"role": "assistant", "content": "a", "finish_reason": []}],
    }
    for name, messages in bad.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"messages": messages}))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "times.json").write_text('{"messages": [], "created": NaN, "updated": 1e300}')
    (tmp_path / "dir.json").mkdir()

    assert [s.id for s in store.list()] == ["times"]
    assert store.load("times").updated == 0.0 and store.load("times").created == 0.0  # shown as 1970, not a crash
    for name in [*bad, "deep"]:
        with pytest.raises(ValueError):
            store.load(name)


def test_conversation_turn_editing() -> None:
    c = Conversation()
    c.add_user("q")
    assert c.ends_with_user and c.drop_last_reply() is None
    c.add_assistant("a", tool_calls=[{"name": "f", "arguments": {"x": 1}}])
    assert c.model_messages()[-1] == {"role": "assistant", "content": "a", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}
    assert c.drop_last_reply()["content"] == "a"
    assert c.drop_last_user() == "q" and c.messages == []
    assert make_title("x" * 100).endswith("…") and len(make_title("x" * 100)) == 60


# ---- stats -------------------------------------------------------------------------------------------
def test_live_rate_counts_tokens_with_a_fake_clock() -> None:
    now = [10.0]
    rate = LiveRate(clock=lambda: now[0])
    assert rate.ttft_s is None and rate.decode_tok_s is None
    now[0] = 10.5
    rate.tick()
    assert rate.ttft_s == pytest.approx(0.5) and rate.decode_tok_s is None
    for _ in range(10):
        now[0] += 0.1
        rate.tick()
    assert rate.tokens == 11 and rate.decode_tok_s == pytest.approx(10.0)


def test_formatting() -> None:
    assert fmt_bytes(None) == "—" and fmt_bytes(512) == "512 B" and fmt_bytes(3 * 2**20) == "3 MiB"
    assert fmt_bytes(int(1.5 * 2**30)) == "1.50 GiB"
    assert fmt_rate(None) == "—" and fmt_rate(12.34) == "12.3 tok/s" and fmt_rate(12345.0) == "12,345 tok/s"
    assert fmt_seconds(0.0421) == "42 ms" and fmt_seconds(2.5) == "2.50 s"


def test_heat_strip_buckets_and_scales() -> None:
    assert bucket([1, 2, 3, 4], 8) == [1, 2, 3, 4]
    assert bucket(list(range(8)), 4) == [1, 5, 9, 13]
    assert sum(bucket(list(range(160)), 24)) == sum(range(160))
    strip = heat_strip([[0, 1, 2, 4], [4, 4, 0, 0]], width=24)
    lines = strip.plain.split("\n")
    assert lines == ["0 ·███", "1 ██··"]
    hottest = {span.style for span in strip.spans if str(span.style) == heat_color(1.0)}
    assert hottest  # the busiest cell gets the hottest colour
    assert heat_strip([]).plain == ""


def test_code_blocks_and_oom_classification() -> None:
    md = "text\n\n```python\nprint(1)\n```\n\nmore\n\n```\nplain\n```\n"
    assert code_blocks(md) == [("python", "print(1)"), ("", "plain")]
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(RuntimeError("CUDA out of memory. Tried"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# ---- command line ------------------------------------------------------------------------------------
def test_chat_command_help_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    from localglm.cli import build_parser, main
    from tui.command import options_from_args

    with pytest.raises(SystemExit) as exc:
        main(["chat", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--system", "--no-think", "--keep-thinking", "--max-new-tokens", "--temperature", "--device", "--ctx", "Ctrl+R", "XDG_DATA_HOME"):
        assert flag in out

    args = build_parser().parse_args(["chat", "some/model", "--no-think", "--system", "be brief", "--ctx", "64", "--temp", "0"])
    opts = options_from_args(args)
    assert (opts.model_path, opts.thinking, opts.system, opts.ctx) == ("some/model", False, "be brief", 64)
    assert opts.sampling == {"temperature": 0.0} and opts.clear_thinking is None
    assert options_from_args(build_parser().parse_args(["chat", "--keep-thinking"])).clear_thinking is False
    assert build_parser().parse_args(["chat"]).model is None

    assert main(["chat", "m", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    # without a terminal (`echo hi | localglm chat`) the app drew its screen and never exited
    assert main(["chat", "m"]) == 2 and "needs a terminal" in capsys.readouterr().err
