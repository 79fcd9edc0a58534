"""`localglm chat` driven through Textual's Pilot against a tiny random model.

A random model babbles, so tests that look at what is shown force the model's tokens with the
engine's `logits_processor` hook, passed through the app's constructor (a test hook, not an option).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import localglm
from tui.app import HINT_DEFAULT, HINT_FIT, ChatApp, ChatOptions, ChatScreen, default_loader, tool_call_markdown
from tui.metrics import MemoryInfo
from tui.screens import ConversationsScreen, ErrorScreen, LoadingScreen, SystemPromptScreen
from tui.store import ConversationStore
from tui.widgets import AssistantMessage, ChatInput, ExpertPanel, StatsPanel, SystemBanner, UserMessage

SIZE = (110, 36)
FIXED_MEMORY = MemoryInfo(ram_used=3 * 2**30, ram_total=64 * 2**30)


# ---- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    """The tiny model is fastest on one thread, and 2-core CI machines are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_dir: Path, one_thread: None) -> localglm.Model:
    return localglm.load(tiny_dir, ctx=512)


def forcing(model: localglm.Model, *texts: str, delay: float = 0.0, loop: bool = False) -> Callable[..., torch.Tensor]:
    """A logits processor that makes the model write `texts[0]`, then `texts[1]` on the next request, ...

    With `loop`, the text repeats forever (until stopped); `delay` slows every token down.
    """
    scripts = [model.tokenizer.encode(t) for t in texts]
    eos = model.config.eos_token_ids[0]
    state = {"request": -1, "calls": 0}

    def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not generated:
            state["request"] += 1
        state["calls"] += 1
        if delay:
            time.sleep(delay)
        script = scripts[min(state["request"], len(scripts) - 1)]
        n = len(generated)
        tok = script[n % len(script)] if loop or n < len(script) else eos
        out = torch.full_like(logits, float("-inf"))
        out[tok] = 0.0
        return out

    force.state = state  # type: ignore[attr-defined]
    return force


class SpyModel:
    """The real model, recording the keyword arguments of every `generate` call."""

    def __init__(self, model: localglm.Model) -> None:
        self._model = model
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self._model.generate(*args, **kwargs)


def make_app(tmp_path: Path, model: Any = None, **kwargs: Any) -> ChatApp:
    options = kwargs.pop("options", None) or ChatOptions(max_new_tokens=kwargs.pop("max_new_tokens", 24))
    kwargs.setdefault("memory_probe", lambda: FIXED_MEMORY)
    return ChatApp(options, data_dir=tmp_path / "chats", model=model, **kwargs)


def drive(app: ChatApp, script: Callable[[Any], Awaitable[None]], size: tuple[int, int] = SIZE) -> None:
    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await script(pilot)

    asyncio.run(main())


async def wait_for(pilot: Any, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


async def chat_screen(pilot: Any) -> ChatScreen:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ChatScreen) and pilot.app.screen.is_mounted)
    await pilot.pause()
    return pilot.app.screen


async def send(pilot: Any, text: str) -> ChatScreen:
    """Type `text` into the prompt box, press Enter and wait for the whole reply."""
    screen = await chat_screen(pilot)
    screen.query_one(ChatInput).load_text(text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: screen.request is not None or screen.conversation.messages[-1]["role"] == "assistant")
    await idle(pilot, screen)
    return screen


async def idle(pilot: Any, screen: ChatScreen) -> None:
    await wait_for(pilot, lambda: screen.request is None)
    await pilot.pause()


# ---- a real chat ----------------------------------------------------------------------------------------
def test_load_send_and_stream(tmp_path: Path, tiny_dir: Path, one_thread: None) -> None:
    """From the loading screen to a streamed reply, with stats, saved to disk."""
    options = ChatOptions(model_path=str(tiny_dir), ctx=512, max_new_tokens=12)
    real_loader = default_loader(options)
    screens_seen: list[str] = []

    def loader(progress: Callable[[str, int, int], None]) -> Any:
        def spy(stage: str, done: int, total: int) -> None:
            screens_seen.append(type(app.screen).__name__)
            progress(stage, done, total)

        return real_loader(spy)

    app = make_app(tmp_path, options=options, loader=loader)

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        assert app.sub_title == "model · thinking on"
        prompt = screen.query_one(ChatInput)
        assert prompt.has_focus
        await pilot.press(*"hi")
        await pilot.press("enter")
        assert prompt.text == ""
        await wait_for(pilot, lambda: bool(screen.query(AssistantMessage)))  # the reply box appears at once
        await idle(pilot, screen)
        user, reply = screen.conversation.messages
        assert user == {"role": "user", "content": "hi"}
        assert reply["role"] == "assistant" and reply["finish_reason"] in ("stop", "length")
        [view] = screen.query(AssistantMessage)
        # what streamed is what was stored (a random model's reply may hold a tool call, shown after the text)
        assert view.content_text == reply["content"] + "".join(tool_call_markdown(c) for c in reply.get("tool_calls", ()))
        assert screen.query_one(UserMessage).text == "hi"
        stats = screen.query_one(StatsPanel)
        last = app.model.last_stats
        assert stats.decode_tokens == last.decode_tokens and stats.prompt_tokens == last.prompt_tokens
        assert stats.ctx_used == last.prompt_tokens + last.decode_tokens and stats.ctx_limit == 512
        assert stats.memory == FIXED_MEMORY
        assert not screen.query_one(ExpertPanel).display  # the in-memory backend reports no expert cache
        saved = ConversationStore(tmp_path / "chats").list()
        assert len(saved) == 1 and saved[0].title == "hi" and saved[0].turns == 2

    drive(app, script)
    assert screens_seen and set(screens_seen) == {"LoadingScreen"}


def test_thinking_block_and_toggle(tmp_path: Path, model: localglm.Model) -> None:
    spy = SpyModel(model)
    force = forcing(model, "<think>plan the answer</think>The **answer**.", "<think>x</think>second")
    app = make_app(tmp_path, spy, logits_processor=force)

    async def script(pilot: Any) -> None:
        screen = await send(pilot, "question")
        view = screen.query(AssistantMessage).last()
        assert (view.thinking_text, view.content_text) == ("plan the answer", "The **answer**.")
        block = view.thinking_block
        assert block.display and block.collapsed  # folded once the answer started
        assert screen.conversation.messages[-1]["reasoning_content"] == "plan the answer"
        await pilot.press("ctrl+f")
        assert not block.collapsed
        await pilot.press("ctrl+f")
        assert block.collapsed
        assert spy.calls[-1]["enable_thinking"] is True

        await pilot.press("ctrl+t")
        assert app.thinking is False and app.sub_title.endswith("thinking off")
        await send(pilot, "again")
        assert spy.calls[-1]["enable_thinking"] is False
        assert screen.conversation.thinking is False
        await pilot.press("ctrl+t")
        assert app.sub_title.endswith("thinking on")

    drive(app, script)


def test_stop_generation(tmp_path: Path, model: localglm.Model) -> None:
    force = forcing(model, "word ", delay=0.01, loop=True)
    app = make_app(tmp_path, model, logits_processor=force, max_new_tokens=400)

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        screen.query_one(ChatInput).load_text("talk forever")
        await pilot.press("enter")
        view = await _streaming_view(pilot, screen)
        assert screen.check_action("stop", ()) is True
        await pilot.press("escape")
        await idle(pilot, screen)
        reply = screen.conversation.messages[-1]
        assert reply["finish_reason"] == "cancelled"
        assert reply["content"].startswith("word") and len(reply["content"]) < 400 * 5
        assert view.content_text == reply["content"]
        assert "stopped" in str(view.query_one(".note").render())
        assert screen.query_one(StatsPanel).state == "stopped"
        assert screen.check_action("stop", ()) is False  # Esc is free again once idle
        assert ConversationStore(tmp_path / "chats").load(screen.conversation.id).messages[-1]["finish_reason"] == "cancelled"

    drive(app, script)


async def _streaming_view(pilot: Any, screen: ChatScreen) -> AssistantMessage:
    await wait_for(pilot, lambda: screen.request is not None and len(screen.request.view.content_text) > 10)
    return screen.request.view


def test_regenerate_replaces_the_last_reply(tmp_path: Path, model: localglm.Model) -> None:
    spy = SpyModel(model)
    app = make_app(tmp_path, spy, logits_processor=forcing(model, "first try", "second try"))

    async def script(pilot: Any) -> None:
        screen = await send(pilot, "hello")
        assert screen.conversation.messages[-1]["content"] == "first try"
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.conversation.messages[-1]["role"] == "assistant")
        await idle(pilot, screen)
        assert [m["content"] for m in screen.conversation.messages] == ["hello", "second try"]
        assert [v.content_text for v in screen.query(AssistantMessage)] == ["second try"]
        assert spy.calls[0]["messages"] == spy.calls[1]["messages"] == [{"role": "user", "content": "hello"}]

    drive(app, script)


def test_regenerate_while_generating_stops_first(tmp_path: Path, model: localglm.Model) -> None:
    force = forcing(model, "slow ", "done", delay=0.01, loop=False)
    force_loop = forcing(model, "slow ", delay=0.01, loop=True)
    calls = {"n": 0}

    def processor(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not generated:
            calls["n"] += 1
        return (force_loop if calls["n"] == 1 else force)(generated, logits)

    app = make_app(tmp_path, model, logits_processor=processor, max_new_tokens=300)

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        screen.query_one(ChatInput).load_text("go")
        await pilot.press("enter")
        await _streaming_view(pilot, screen)
        await pilot.press("ctrl+r")  # stops the running reply, then regenerates it
        await wait_for(pilot, lambda: calls["n"] == 2)
        await idle(pilot, screen)
        assert [m["role"] for m in screen.conversation.messages] == ["user", "assistant"]
        assert len(screen.query(AssistantMessage)) == 1

    drive(app, script)


def test_regenerate_twice_before_the_stop_lands(tmp_path: Path, model: localglm.Model) -> None:
    """Two Ctrl+R (or Ctrl+R then Ctrl+N) queued behind one stop: one generation at a time, none orphaned."""
    app = make_app(tmp_path, model, logits_processor=forcing(model, "slow ", delay=0.01, loop=True), max_new_tokens=300)

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        screen.query_one(ChatInput).load_text("go")
        await pilot.press("enter")
        await _streaming_view(pilot, screen)
        await screen.action_regenerate()  # both queued before the running reply has seen its cancel
        await screen.action_regenerate()
        await wait_for(pilot, lambda: screen.request is not None and screen.request.id == 3 and len(screen.request.view.content_text) > 10)
        screen.action_stop()
        await idle(pilot, screen)
        await pilot.pause(0.2)
        assert [m["role"] for m in screen.conversation.messages] == ["user", "assistant"]
        views = list(screen.query(AssistantMessage))
        assert len(views) == 1 and not views[0].streaming  # no reply box left saying "generating…"
        assert not any(n.severity == "error" for n in app._notifications), [n.message for n in app._notifications]

    drive(app, script)


def test_enter_while_a_regenerate_is_starting_waits_its_turn(tmp_path: Path, model: localglm.Model) -> None:
    """Ctrl+R runs on the app's message pump, Enter on the screen's: an Enter that lands while the
    regenerate awaits the old reply's removal must not start a second generation beside it."""
    spy = SpyModel(model)
    app = make_app(tmp_path, spy, logits_processor=forcing(model, "first", "second", "third"))

    async def script(pilot: Any) -> None:
        screen = await send(pilot, "hello")
        box = screen.query_one(ChatInput)
        regenerating = asyncio.ensure_future(screen.action_regenerate())
        await asyncio.sleep(0)  # it runs up to its first await
        box.load_text("again")
        await screen.send(ChatInput.Submitted(box, "again"))
        await regenerating
        await idle(pilot, screen)
        await pilot.pause(0.2)
        assert [c["messages"] for c in spy.calls] == [[{"role": "user", "content": "hello"}]] * 2  # the reply, then its regeneration
        assert [m["content"] for m in screen.conversation.messages] == ["hello", "second"]
        assert box.text == "again"  # refused while busy: the text stays in the box to send again
        views = list(screen.query(AssistantMessage))
        assert len(views) == 1 and not views[0].streaming

    drive(app, script)


def test_multiline_input(tmp_path: Path, model: localglm.Model) -> None:
    spy = SpyModel(model)
    app = make_app(tmp_path, spy, logits_processor=forcing(model, "ok"))

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        await pilot.press("a", "shift+enter", "b", "ctrl+j", "c")
        assert screen.query_one(ChatInput).text == "a\nb\nc"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(screen.conversation.messages) == 2)
        await idle(pilot, screen)
        assert spy.calls[0]["messages"] == [{"role": "user", "content": "a\nb\nc"}]
        await pilot.press("enter")  # Enter on an empty box sends nothing
        assert len(spy.calls) == 1

    drive(app, script)


def test_odd_characters_are_sent_and_saved(tmp_path: Path, model: localglm.Model) -> None:
    """Control characters, RTL/zero-width marks, emoji and lone surrogates (a pasted half of a pair, or a
    --system argument's undecodable byte) reach the model and the saved file without crashing the app."""
    spy = SpyModel(model)
    options = ChatOptions(system="sys \udcff", max_new_tokens=8)
    app = make_app(tmp_path, spy, options=options, logits_processor=forcing(model, "ok"))
    text = "a\x00b\x1b[31m \u202eabc\u200b\ufeff 👩\u200d👧 [bold]x[/] lone \ud800 end"

    async def script(pilot: Any) -> None:
        screen = await send(pilot, text)
        assert [m["role"] for m in screen.conversation.messages] == ["user", "assistant"]
        assert spy.calls[-1]["messages"][-1]["content"] == text
        saved = ConversationStore(tmp_path / "chats").load(screen.conversation.id)
        assert saved.messages[0]["content"] == text and saved.system == "sys \udcff"
        assert not any(n.severity == "error" for n in app._notifications)

    drive(app, script)


def test_system_prompt_editor(tmp_path: Path, model: localglm.Model) -> None:
    spy = SpyModel(model)
    app = make_app(tmp_path, spy, logits_processor=forcing(model, "ok"))

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        assert not screen.query_one(SystemBanner).display
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SystemPromptScreen))
        app.screen.query_one("#system-text").load_text("Answer in French.")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen is screen)
        assert screen.query_one(SystemBanner).display
        await send(pilot, "bonjour")
        assert spy.calls[-1]["messages"][0] == {"role": "system", "content": "Answer in French."}
        # Esc in the editor cancels without changing anything.
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, SystemPromptScreen))
        app.screen.query_one("#system-text").load_text("ignored")
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen)
        assert screen.conversation.system == "Answer in French."

    drive(app, script)


def test_copy_code_blocks(tmp_path: Path, model: localglm.Model) -> None:
    reply = "Two blocks:\n\n```python\nprint('one')\n```\n\nand\n\n```sh\necho two\n```\n"
    app = make_app(tmp_path, model, logits_processor=forcing(model, reply), max_new_tokens=200)

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        await pilot.press("ctrl+b")
        assert app.clipboard == ""  # nothing to copy yet
        await send(pilot, "code please")
        await pilot.press("ctrl+b")
        assert app.clipboard == "echo two"  # the newest block first
        await pilot.press("ctrl+b")
        assert app.clipboard == "print('one')"  # then walking back
        fences = screen.query_one(AssistantMessage).query("CopyableFence")
        assert len(fences) == 2  # highlighted code blocks, clickable to copy
        app.copy_to_clipboard("")
        await pilot.click(fences.first())
        assert app.clipboard == "print('one')"

    drive(app, script)


def test_new_chat_save_and_reload(tmp_path: Path, model: localglm.Model) -> None:
    app = make_app(tmp_path, model, logits_processor=forcing(model, "reply one", "reply two"))

    async def script(pilot: Any) -> None:
        screen = await send(pilot, "first chat")
        first_id = screen.conversation.id
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert not screen.query(UserMessage) and not screen.query(AssistantMessage)
        assert screen.conversation.messages == [] and screen.conversation.id != first_id
        await send(pilot, "second chat")
        assert len(ConversationStore(tmp_path / "chats").list()) == 2

        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        await pilot.pause()
        await pilot.press("down", "enter")  # newest first: the first chat is second in the list
        await wait_for(pilot, lambda: app.screen is screen and screen.conversation.id == first_id)
        await pilot.pause()
        assert [u.text for u in screen.query(UserMessage)] == ["first chat"]
        assert [v.content_text for v in screen.query(AssistantMessage)] == ["reply one"]
        await send(pilot, "more")  # continuing a reloaded chat saves into the same file
        assert len(ConversationStore(tmp_path / "chats").list()) == 2
        assert len(ConversationStore(tmp_path / "chats").load(first_id).messages) == 4

    drive(app, script)


def test_quit_mid_generation_is_clean(tmp_path: Path, model: localglm.Model) -> None:
    force = forcing(model, "more ", delay=0.05, loop=True)
    app = make_app(tmp_path, model, logits_processor=force, max_new_tokens=400)
    quit_at: list[float] = []

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        screen.query_one(ChatInput).load_text("go on")
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.request is not None and bool(screen.request.view.content_text))
        quit_at.append(time.monotonic())
        await pilot.press("ctrl+q")

    drive(app, script)  # returns once the worker thread has ended too
    assert time.monotonic() - quit_at[0] < 5.0  # 400 tokens x 50 ms would be 20 s
    [saved] = ConversationStore(tmp_path / "chats").list()
    reply = ConversationStore(tmp_path / "chats").load(saved.id).messages[-1]
    # the partial reply is kept: some prefix of the forced "more more more ..." stream
    assert reply["finish_reason"] == "cancelled" and reply["content"] and ("more " * 400).startswith(reply["content"])
    calls = force.state["calls"]
    time.sleep(0.2)
    assert force.state["calls"] == calls  # nothing is still generating
    assert model.generate_text(messages=[{"role": "user", "content": "x"}], max_new_tokens=2) is not None  # model free


def test_quit_while_loading_is_clean(tmp_path: Path) -> None:
    """Quitting on the loading screen ends the load at its next progress report."""
    reports: list[int] = []

    def loader(progress: Callable[[str, int, int], None]) -> Any:
        for i in range(1000):  # a 100 s load if nothing stopped it
            reports.append(i)
            progress("experts", i, 1000)
            time.sleep(0.1)
        raise AssertionError("the load was not aborted")

    app = make_app(tmp_path, options=ChatOptions(model_path="models/big"), loader=loader)
    started: list[float] = []

    async def script(pilot: Any) -> None:
        await wait_for(pilot, lambda: isinstance(app.screen, LoadingScreen) and len(reports) >= 2)
        started.append(time.monotonic())
        await pilot.press("ctrl+q")

    drive(app, script)
    assert time.monotonic() - started[0] < 3.0 and len(reports) < 100
    assert app.return_code == 0 and app.error_message is None


def test_expert_panel_shows_only_with_backend_stats(tmp_path: Path, model: localglm.Model) -> None:
    app = make_app(tmp_path, model)

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        panel = screen.query_one(ExpertPanel)
        assert not panel.display
        panel.show_backend({"hit_rate": 0.875, "layer_heat": [[1, 0, 3], [2, 2, 2]], "bytes_moved": 3 * 2**20})
        await pilot.pause()
        assert panel.display
        shown = app.export_screenshot()
        for text in ("Experts", "cache hit rate", "87.5%", "bytes moved", "3 MiB", "expert use per layer"):
            assert text.replace(" ", "&#160;") in shown, text
        panel.show_backend({"decode_steps": 3})  # counters without the known keys: hidden
        assert not panel.display

    drive(app, script)


def test_prompt_longer_than_context_is_reported(tmp_path: Path, model: localglm.Model) -> None:
    """The engine's error (prompt too long) appears as a notification; the text goes back into the box."""
    app = make_app(tmp_path, model)
    long_text = "many words " * 400  # far more than the 512-token context

    async def script(pilot: Any) -> None:
        screen = await chat_screen(pilot)
        screen.query_one(ChatInput).load_text(long_text)
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.request is None and not screen.query(UserMessage) and bool(app._notifications))
        assert screen.conversation.messages == [] and not screen.query(AssistantMessage)
        assert screen.query_one(ChatInput).text == long_text.strip()
        assert any("context" in n.message for n in app._notifications)

    drive(app, script)


# ---- errors ---------------------------------------------------------------------------------------------
def _error_screen_run(app: ChatApp) -> ErrorScreen:
    found: list[ErrorScreen] = []

    async def script(pilot: Any) -> None:
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen))
        found.append(app.screen)
        await pilot.press("q")

    drive(app, script)
    return found[0]


def test_bad_model_path_shows_error_screen(tmp_path: Path) -> None:
    app = make_app(tmp_path, options=ChatOptions(model_path=str(tmp_path / "no" / "such" / "model")))
    screen = _error_screen_run(app)
    assert "no such file or directory" in screen.message
    assert "localglm chat PATH/TO/MODEL" in screen.hint
    assert app.return_code == 2 and app.error_message == screen.message


def test_missing_default_model_says_to_pass_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import localglm.default_model as dm

    monkeypatch.setattr(dm, "DEFAULT_MODEL_DIR", tmp_path / "not-installed")
    screen = _error_screen_run(make_app(tmp_path, options=ChatOptions(model_path=None)))
    assert "pass a model directory" in screen.message and screen.hint == HINT_DEFAULT


def test_model_that_does_not_fit_shows_the_way_out(tmp_path: Path) -> None:
    def loader(progress: Callable[[str, int, int], None]) -> Any:
        progress("dense", 1, 3)
        raise MemoryError("Unable to allocate 512 GiB")

    screen = _error_screen_run(make_app(tmp_path, options=ChatOptions(model_path="big"), loader=loader))
    assert screen.message.startswith("out of memory while loading") and screen.hint == HINT_FIT


# ---- snapshots (pytest-textual-snapshot; refresh with `pytest tests/test_tui.py --snapshot-update`) ------
SNAP_SIZE = (120, 44)


def test_snapshot_main_screen(snap_compare: Any, tmp_path: Path, model: localglm.Model) -> None:
    """A finished reply with folded thinking, Markdown and a highlighted code block; stats fixed."""
    from localglm.stats import GenerationStats

    reply = (
        "<think>They want a greeting function. Keep it short.</think>"
        "Here is a **tiny** function:\n\n```python\ndef greet(name):\n    return f\"Hello, {name}!\"\n```\n\n"
        "Call it as `greet(\"Ada\")`."
    )
    options = ChatOptions(system="You are a concise assistant.", max_new_tokens=200)
    app = make_app(tmp_path, model, options=options, logits_processor=forcing(model, reply), memory_interval=3600)
    heat = [[((e * 37 + layer * 11) % 23) ** 2 for e in range(64)] for layer in range(6)]
    stats = GenerationStats(
        prompt_tokens=38, prompt_s=0.05, decode_tokens=52, decode_s=2.55, ttft_s=0.05, finish_reason="stop",
        backend={"hit_rate": 0.873, "bytes_moved": 3 * 2**29, "layer_heat": heat},
    )

    async def run_before(pilot: Any) -> None:
        screen = await send(pilot, "Write a greeting function in Python.")
        screen.query_one(ChatInput).cursor_blink = False
        screen.stats_panel.show_final(stats)  # timings vary from run to run: show fixed ones
        screen.query_one(ExpertPanel).show_backend(stats.backend)
        await pilot.pause()

    assert snap_compare(app, terminal_size=SNAP_SIZE, run_before=run_before)


def test_snapshot_loading_screen(snap_compare: Any, tmp_path: Path) -> None:
    def loader(progress: Callable[[str, int, int], None]) -> Any:
        progress("dense", 1, 1)
        while True:  # until the app quits: then progress() raises and the load ends
            progress("experts", 17, 45)
            time.sleep(0.02)

    app = make_app(tmp_path, options=ChatOptions(model_path="models/GLM-4.5-Air"), loader=loader)

    async def run_before(pilot: Any) -> None:
        await wait_for(pilot, lambda: "17 of 45" in str(app.screen.query_one("#loading-status").render()))

    assert snap_compare(app, terminal_size=(100, 24), run_before=run_before)


def test_snapshot_error_screen(snap_compare: Any, tmp_path: Path) -> None:
    def loader(progress: Callable[[str, int, int], None]) -> Any:
        raise localglm.LocalGLMError("models/GLM-4.6: no such file or directory")

    app = make_app(tmp_path, options=ChatOptions(model_path="models/GLM-4.6"), loader=loader)

    async def run_before(pilot: Any) -> None:
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen))

    assert snap_compare(app, terminal_size=(100, 24), run_before=run_before)
