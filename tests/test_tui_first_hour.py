"""The chat app as a newcomer meets it: F1 lists the chat's own keys before the prompt box's editing keys,
and the stats panel shows the prefill figures as soon as the prompt is processed, not when the reply ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import localglm
from tests.test_tui import chat_screen, drive, forcing, make_app, wait_for
from tui.widgets import ChatInput, ChatKeysTable


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> localglm.Model:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield localglm.load(tiny_dir, ctx=512)
    torch.set_num_threads(before)


def test_f1_lists_the_chats_own_keys_first(tmp_path: Path, model: localglm.Model) -> None:
    rows: list[str] = []

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        screen.query_one(ChatInput).focus()
        await pilot.press("f1")
        await wait_for(pilot, lambda: bool(pilot.app.screen.query(ChatKeysTable)))
        await pilot.pause()
        table = pilot.app.screen.query_one(ChatKeysTable).render()
        rows.extend(str(cell) for cell in table.columns[1].cells)
        await pilot.press("f1")
        await wait_for(pilot, lambda: not pilot.app.screen.query(ChatKeysTable))

    drive(make_app(tmp_path, model), script, size=(110, 36))
    chat = rows[: rows.index("general")]  # Stop is listed only while a reply is being written
    for what in ("Send the message", "New line", "Regenerate", "New", "Thinking", "System", "Chats", "Copy code", "Stats", "Keys", "Quit"):
        assert what in chat, (what, chat)
    assert rows.index("general") < rows.index("editing the prompt")
    assert rows.index("Quit") < 20  # all of the chat's own keys are on the first screen, not below row 45
    assert len(rows) - rows.index("editing the prompt") > 20  # the editing keys are still listed, after the chat's


def test_stats_show_prefill_before_the_reply_ends(tmp_path: Path, model: localglm.Model) -> None:
    seen: dict[str, Any] = {}

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        screen.query_one(ChatInput).load_text("hello there")
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.stats_panel.prefill_tok_s is not None or screen.request is None)
        seen["running"] = screen.request is not None
        seen["prefill"] = screen.stats_panel.prefill_tok_s
        seen["ttft"] = screen.stats_panel.ttft_s
        seen["state"] = screen.stats_panel.state
        screen.action_stop()
        await wait_for(pilot, lambda: screen.request is None)

    app = make_app(tmp_path, model, logits_processor=forcing(model, "a b c d e f g", delay=0.05, loop=True), max_new_tokens=200)
    drive(app, script)
    assert seen["running"], "the prefill figures only appeared once the reply had ended"
    assert seen["prefill"] > 0 and seen["ttft"] > 0 and seen["state"] == "decoding"
