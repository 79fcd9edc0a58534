"""`localglm chat`: a Textual app that streams a GLM model's thinking and answers.

The model runs in thread workers (loading and generating), which talk to the UI only by posting
messages, so the UI never waits on the model. Quitting sets the generation's cancel event (and
aborts a load at the next layer), so the process exits within a token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from localglm.errors import LocalGLMError

from .metrics import LiveRate, MemoryProbe, probe_memory
from .screens import ConversationsScreen, ErrorScreen, LoadingScreen, SystemPromptScreen
from .store import Conversation, ConversationStore
from .widgets import NOTES, AssistantMessage, ChatInput, ExpertPanel, KeysPanel, StatsPanel, SystemBanner, UserMessage

# (stage, done, total) -> None, as `localglm.load` calls it
ProgressFn = Callable[[str, int, int], None]
Loader = Callable[[ProgressFn], Any]

HINT_PATH = (
    "Pass a model directory: localglm chat PATH/TO/MODEL\n"
    "A model directory holds config.json, the *.safetensors weights and tokenizer.json.\n"
    "`localglm inspect PATH` checks a directory without loading it.\n\n"
    "Press q to quit."
)
HINT_DEFAULT = (
    "The default model that ships inside localglm is missing from this install, so name a model:\n"
    "    localglm chat PATH/TO/MODEL\n"
    "A model directory holds config.json, the *.safetensors weights and tokenizer.json.\n\n"
    "Press q to quit."
)
HINT_FIT = (
    "The model does not fit in memory with these settings. Ways out:\n"
    "  • a smaller context: --ctx 2048\n"
    "  • a smaller dtype: --dtype bfloat16\n"
    "  • a quantized checkpoint, or a smaller model (GLM-4.5-Air)\n"
    "  • --device cpu when the GPU is the one that is full\n"
    "`localglm inspect PATH` shows how much memory the model needs.\n\n"
    "Press q to quit."
)


@dataclass
class ChatOptions:
    """What `localglm chat` was asked for on the command line."""

    model_path: str | Path | None = None
    device: str = "cpu"
    dtype: str | None = None
    ctx: int | None = None
    threads: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    system: str = ""
    thinking: bool = True
    clear_thinking: bool | None = None  # False: keep earlier replies' reasoning in the prompt (--keep-thinking)
    max_new_tokens: int | None = None  # None: up to the context limit
    load_options: dict[str, Any] = field(default_factory=dict)  # quantization / offloading (cli.load_options)
    cache_ram: int | None = None  # bytes for chats set aside while you switch between them (--cache-ram); None: the default
    cache_dir: Path | None = None  # --cache-dir: chats' caches on disk too, across restarts (localglm/prompt_disk.py)
    cache_disk: int | None = None  # --cache-disk: bytes; None: the default

    @property
    def model_label(self) -> str:
        return Path(self.model_path).name or str(self.model_path) if self.model_path else "the default model"


class LoadAborted(Exception):
    """Raised from the progress callback to stop a load when the app quits."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def default_loader(options: ChatOptions) -> Loader:
    """The real loader: the default model when no path is given, `--threads`, then `localglm.load`."""

    def load_model(progress: ProgressFn) -> Any:
        from localglm.commands.flags import set_threads
        from localglm.default_model import default_model_path
        from localglm.loader import load
        from localglm.prompt_cache import prompt_cache_for

        path = options.model_path if options.model_path is not None else default_model_path()
        set_threads(options.threads)
        model = load(path, device=options.device, dtype=options.dtype, ctx=options.ctx, progress=progress, **options.load_options)
        # chats you switch between keep their caches (and with --cache-dir, keep them across restarts)
        model.prompt_cache = prompt_cache_for(options.cache_ram, disk_dir=options.cache_dir, disk_budget=options.cache_disk, setup=model.setup)
        return model

    return load_model


# ---- worker -> UI messages --------------------------------------------------------------------------
class LoadProgress(Message):
    def __init__(self, stage: str, done: int, total: int) -> None:
        super().__init__()
        self.stage, self.done, self.total = stage, done, total


class LoadFinished(Message):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model


class LoadFailed(Message):
    def __init__(self, message: str, hint: str) -> None:
        super().__init__()
        self.message, self.hint = message, hint


class GenStarted(Message):
    def __init__(self, gen_id: int, prompt_tokens: int | None) -> None:
        super().__init__()
        self.gen_id, self.prompt_tokens = gen_id, prompt_tokens


class GenPrefilled(Message):
    """The prompt has been processed: the model is about to sample its first token."""

    def __init__(self, gen_id: int, seconds: float) -> None:
        super().__init__()
        self.gen_id, self.seconds = gen_id, seconds


class GenDelta(Message):
    def __init__(self, gen_id: int, kind: str, text: str) -> None:
        super().__init__()
        self.gen_id, self.kind, self.text = gen_id, kind, text


class GenFinished(Message):
    def __init__(self, gen_id: int, done: Any, thinking: str, content: str, tool_calls: list[dict[str, Any]]) -> None:
        super().__init__()
        self.gen_id, self.done = gen_id, done
        self.thinking, self.content, self.tool_calls = thinking, content, tool_calls


class GenFailed(Message):
    def __init__(self, gen_id: int, message: str) -> None:
        super().__init__()
        self.gen_id, self.message = gen_id, message


@dataclass
class GenRequest:
    id: int
    conversation: Conversation
    messages: list[dict[str, Any]]
    thinking: bool
    max_new_tokens: int
    view: AssistantMessage
    cancel: threading.Event = field(default_factory=threading.Event)
    user_view: UserMessage | None = None  # set when this request came from sending a message
    replaced: dict[str, Any] | None = None  # the reply a regeneration replaces (restored on failure)


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced or indented code block in `markdown` (trailing newlines dropped)."""
    return [
        (tok.info.strip(), tok.content.rstrip("\n"))
        for tok in MarkdownIt("gfm-like").parse(markdown)
        if tok.type in ("fence", "code_block")
    ]


# ---- the chat screen --------------------------------------------------------------------------------
class ChatScreen(Screen):
    """Transcript, stats sidebar, prompt box."""

    DEFAULT_CSS = """
    #body { height: 1fr; }
    #transcript { width: 1fr; padding: 0 1 1 1; }
    #sidebar { width: 38; padding: 0 1 0 0; scrollbar-size-vertical: 1; }
    #welcome { color: $text-muted; margin: 1 0 0 0; }
    ChatInput { margin: 0 1; }
    /* Narrow terminals give the transcript the room; F2 brings the panel back. */
    ChatScreen.-narrow #sidebar { display: none; }
    ChatScreen.-narrow.-sidebar-on #sidebar { display: block; }
    ChatScreen.-sidebar-off #sidebar { display: none; }
    """

    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (90, "-wide")]

    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+t", "toggle_thinking", "Thinking"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+o", "open_chats", "Chats"),
        Binding("ctrl+s", "edit_system", "System"),
        Binding("ctrl+b", "copy_code", "Copy code"),
        Binding("ctrl+f", "fold_thinking", "Fold thinking", show=False),
        Binding("f2", "toggle_sidebar", "Stats", show=False),
        Binding("f1", "toggle_keys", "Keys"),
    ]

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.conversation = Conversation()
        self.request: GenRequest | None = None
        self._gen_ids = 0
        self._after_idle: list[Callable[[], Awaitable[None] | None]] = []
        self._turn_taken = False  # a send or a queued action is running (it may start a generation)
        self._rate: LiveRate | None = None
        self._copy_cursor: int | None = None

    @property
    def chat_app(self) -> ChatApp:
        app = self.app
        assert isinstance(app, ChatApp)
        return app

    @property
    def busy(self) -> bool:
        """A generation is running (stopping counts: the model is still busy until it ends), or a turn that
        may start one is under way (`_take_turn`)."""
        return self.request is not None or self._turn_taken

    # ---- layout ----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Horizontal(id="body"):
            with VerticalScroll(id="transcript"):
                yield SystemBanner(id="system-banner")
                yield Static(
                    "Ask anything.  Enter sends, Shift+Enter (or Ctrl+J) adds a line, F1 lists every key.",
                    id="welcome",
                )
            with VerticalScroll(id="sidebar"):
                yield StatsPanel(ctx_limit=self.model.ctx, id="stats")
                yield ExpertPanel(id="experts")
        yield ChatInput(id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        app = self.chat_app
        self.conversation = self._fresh_conversation()
        self._refresh_titles()
        self.query_one(SystemBanner).set_prompt(self.conversation.system)
        self.query_one("#transcript", VerticalScroll).anchor()
        self._poll_memory()
        self.set_interval(app.memory_interval, self._poll_memory)
        self._live_timer = self.set_interval(0.25, self._tick_live, pause=True)
        self.query_one(ChatInput).focus()

    def _fresh_conversation(self) -> Conversation:
        app = self.chat_app
        return Conversation(system=app.options.system, model=Path(str(self.model.path)).name, thinking=app.thinking)

    def _refresh_titles(self) -> None:
        app = self.chat_app
        name = Path(str(self.model.path)).name
        app.sub_title = f"{name} · thinking {'on' if app.thinking else 'off'}"

    @property
    def transcript(self) -> VerticalScroll:
        return self.query_one("#transcript", VerticalScroll)

    @property
    def stats_panel(self) -> StatsPanel:
        return self.query_one(StatsPanel)

    async def _clear_transcript(self) -> None:
        await self.transcript.query(".message").remove()
        self._copy_cursor = None

    async def _render_conversation(self) -> None:
        """Show the whole current conversation (after new chat or reload)."""
        await self._clear_transcript()
        conv = self.conversation
        self.query_one(SystemBanner).set_prompt(conv.system)
        widgets = []
        for m in conv.messages:
            if m["role"] == "user":
                widgets.append(UserMessage(m["content"]))
            else:
                content = m["content"] + "".join(tool_call_markdown(c) for c in m.get("tool_calls", ()))
                widgets.append(AssistantMessage(m.get("reasoning_content", ""), content, NOTES.get(m.get("finish_reason", ""), "")))
        self.query_one("#welcome").display = not widgets
        if widgets:
            await self.transcript.mount_all(widgets)
        self.transcript.anchor()

    # ---- sending and generating --------------------------------------------------------------------
    @on(ChatInput.Submitted)
    async def send(self, event: ChatInput.Submitted) -> None:
        event.stop()
        if self.busy:
            self.notify("Still generating: Esc stops it.", severity="warning", timeout=3)
            return
        text = event.text.strip()
        event.chat_input.clear()
        await self._take_turn(lambda: self._send_text(text))

    async def _send_text(self, text: str) -> None:
        self.conversation.add_user(text)
        self.query_one("#welcome").display = False
        user_view = UserMessage(text)
        await self.transcript.mount(user_view)
        self.chat_app.save(self.conversation)
        await self._start_generation(user_view=user_view)

    async def _start_generation(self, *, user_view: UserMessage | None = None, replaced: dict[str, Any] | None = None) -> None:
        app = self.chat_app
        self._gen_ids += 1
        view = AssistantMessage(streaming=True)
        req = GenRequest(
            id=self._gen_ids,
            conversation=self.conversation,
            messages=self.conversation.model_messages(),
            thinking=app.thinking,
            max_new_tokens=app.options.max_new_tokens or self.model.ctx,
            view=view,
            user_view=user_view,
            replaced=replaced,
        )
        self.request = req
        self._copy_cursor = None
        await self.transcript.mount(view)
        self.transcript.anchor()
        self._rate = LiveRate()
        self.stats_panel.start_live(None)
        self._live_timer.resume()
        self.refresh_bindings()
        self._generate(req)

    @work(thread=True, group="generate", exit_on_error=True)
    def _generate(self, req: GenRequest) -> None:
        """Runs in a thread: stream the model's events back to the UI as messages."""
        from localglm.engine import Done
        from localglm.chat.stream_parser import ContentDelta, ThinkingDelta, ToolCallEnd

        app = self.chat_app
        model = self.model
        post = self._post
        try:
            prompt_tokens = None
            if model.tokenizer is not None:
                rendered = model.render_chat(req.messages, enable_thinking=req.thinking, clear_thinking=app.options.clear_thinking)
                prompt_tokens = len(model.tokenizer.encode(rendered))
            post(GenStarted(req.id, prompt_tokens))
            thinking: list[str] = []
            content: list[str] = []
            calls: list[dict[str, Any]] = []
            done = None
            started = time.perf_counter()
            user_processor = app.logits_processor

            def processor(generated: list[int], logits: Any) -> Any:
                """The engine calls this before sampling each token: the first call means prefill is over."""
                if not generated:
                    post(GenPrefilled(req.id, time.perf_counter() - started))
                return user_processor(generated, logits) if user_processor is not None else logits

            for ev in model.generate(
                messages=req.messages,
                enable_thinking=req.thinking,
                clear_thinking=app.options.clear_thinking,
                max_new_tokens=req.max_new_tokens,
                cancel=req.cancel,
                logits_processor=processor,
                **app.options.sampling,
            ):
                if isinstance(ev, ThinkingDelta):
                    thinking.append(ev.text)
                    post(GenDelta(req.id, "thinking", ev.text))
                elif isinstance(ev, ContentDelta):
                    content.append(ev.text)
                    post(GenDelta(req.id, "content", ev.text))
                elif isinstance(ev, ToolCallEnd):
                    call = {"name": ev.call.name, "arguments": dict(ev.call.arguments)}
                    calls.append(call)
                    post(GenDelta(req.id, "tool", tool_call_markdown(call)))
                elif isinstance(ev, Done):
                    done = ev
            # The loop has ended, so the generator has released the model: the next request may start.
            post(GenFinished(req.id, done, "".join(thinking), "".join(content), calls))
        except LocalGLMError as exc:
            post(GenFailed(req.id, str(exc)))

    def _post(self, message: Message) -> None:
        try:
            self.post_message(message)
        except RuntimeError:  # the event loop is gone: the app has quit
            pass

    def on_gen_started(self, message: GenStarted) -> None:
        if self.request and message.gen_id == self.request.id:
            self.stats_panel.start_live(message.prompt_tokens)

    def on_gen_prefilled(self, message: GenPrefilled) -> None:
        if self.request and message.gen_id == self.request.id:
            self.stats_panel.show_prefill(message.seconds)

    async def on_gen_delta(self, message: GenDelta) -> None:
        req = self.request
        if req is None or message.gen_id != req.id:
            return
        if self._rate is not None:
            self._rate.tick()
        if message.kind == "thinking":
            await req.view.add_thinking(message.text)
        else:
            await req.view.add_content(message.text)

    async def on_gen_finished(self, message: GenFinished) -> None:
        req = self.request
        if req is None or message.gen_id != req.id:
            return
        done = message.done
        reason = done.finish_reason if done is not None else "stop"
        await req.view.finish(NOTES.get(reason, ""))
        if message.content or message.thinking or message.tool_calls:
            req.conversation.add_assistant(message.content, message.thinking, message.tool_calls, reason)
        else:
            await req.view.remove()
            if reason == "cancelled":
                self.notify("Stopped before the first token.", timeout=2)
        if done is not None:
            self.stats_panel.show_final(done.stats)
            self.query_one(ExpertPanel).show_backend(done.stats.backend)
        self.chat_app.save(req.conversation)
        await self._finish_request()

    async def on_gen_failed(self, message: GenFailed) -> None:
        req = self.request
        if req is None or message.gen_id != req.id:
            return
        await req.view.finish()
        await req.view.remove()
        if req.replaced is not None:
            req.conversation.messages.append(req.replaced)
            if req.conversation is self.conversation:
                m = req.replaced
                await self.transcript.mount(AssistantMessage(m.get("reasoning_content", ""), m["content"], NOTES.get(m.get("finish_reason", ""), "")))
        elif req.user_view is not None:
            text = req.conversation.drop_last_user()
            await req.user_view.remove()
            prompt = self.query_one(ChatInput)
            if text and not prompt.text.strip():
                prompt.load_text(text)
        self.chat_app.save(req.conversation)
        self.stats_panel.clear_run()
        self.notify(message.message, title="Generation failed", severity="error", timeout=8)
        await self._finish_request()

    async def _finish_request(self) -> None:
        self.request = None
        self._rate = None
        self._live_timer.pause()
        self.refresh_bindings()
        await self._run_queued()

    async def _run_queued(self) -> None:
        """Run the actions queued while busy, in order."""
        pending, self._after_idle = self._after_idle, []
        for callback in pending:
            # Through _when_idle: when an earlier callback started a generation (Ctrl+R pressed twice before
            # the stop took effect), the next one stops it and waits, instead of starting a second generation.
            await self._when_idle(callback)

    def _tick_live(self) -> None:
        if self._rate is not None and self.request is not None:
            self.stats_panel.show_live(self._rate)

    def _poll_memory(self) -> None:
        self.stats_panel.show_memory(self.chat_app.memory_probe())

    async def _when_idle(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Run `callback` now, or stop the running generation and run it when it has ended (or, while a
        send or another action is still starting, when that turn is over)."""
        if self.request is None and not self._turn_taken:
            await self._take_turn(callback)
        else:
            self._after_idle.append(callback)
            if self.request is not None:
                self.request.cancel.set()

    async def _take_turn(self, body: Callable[[], Awaitable[None] | None]) -> None:
        """Run `body`, which may start a generation, as the only such turn: actions run on the app's message
        pump and Enter on the screen's, so without this an Enter landing while Ctrl+R awaited the old reply's
        removal started a second generation. Actions queued meanwhile then stop what it started, or run."""
        self._turn_taken = True
        try:
            result = body()
            if result is not None:
                await result
        finally:
            self._turn_taken = False
        if self._after_idle:
            if self.request is not None:
                self.request.cancel.set()  # _finish_request runs them when it has ended
            else:
                await self._run_queued()

    def abandon_generation(self) -> None:
        """The app is quitting: stop the model and save what was written so far (its end is never seen)."""
        req = self.request
        if req is None:
            return
        req.cancel.set()
        self.request = None
        if req.view.content_text or req.view.thinking_text:
            req.conversation.add_assistant(req.view.content_text, req.view.thinking_text, finish_reason="cancelled")
        self.chat_app.save(req.conversation)

    # ---- actions ---------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.request is not None and not self.request.cancel.is_set()
        return True

    def action_stop(self) -> None:
        if self.request is not None:
            self.request.cancel.set()
            self.stats_panel.state = "stopping"
            self.stats_panel.redraw()
            self.refresh_bindings()

    def action_toggle_thinking(self) -> None:
        app = self.chat_app
        app.thinking = not app.thinking
        self.conversation.thinking = app.thinking
        self._refresh_titles()
        self.notify(f"Thinking {'on' if app.thinking else 'off'} (from the next reply)", timeout=2)

    async def action_regenerate(self) -> None:
        await self._when_idle(self._regenerate)

    async def _regenerate(self) -> None:
        conv = self.conversation
        if not any(m["role"] == "user" for m in conv.messages):
            self.notify("Nothing to regenerate yet.", timeout=2)
            return
        replaced = conv.drop_last_reply()
        if replaced is not None:
            views = self.transcript.query(AssistantMessage)
            if views:
                await views.last().remove()
        await self._start_generation(replaced=replaced)

    async def action_new_chat(self) -> None:
        await self._when_idle(self._new_chat)

    async def _new_chat(self) -> None:
        self.conversation = self._fresh_conversation()
        self.stats_panel.clear_run()
        await self._render_conversation()
        self.query_one(ChatInput).focus()

    def action_open_chats(self) -> None:
        self.app.push_screen(ConversationsScreen(self.chat_app.store), self._chat_chosen)

    async def _chat_chosen(self, conv_id: str | None) -> None:
        if conv_id:
            await self._when_idle(lambda: self.open_conversation(conv_id))

    async def open_conversation(self, conv_id: str) -> None:
        try:
            conv = self.chat_app.store.load(conv_id)
        except (OSError, ValueError) as exc:
            self.notify(f"Could not open that conversation: {exc}", severity="error")
            return
        self.conversation = conv
        self.chat_app.thinking = conv.thinking
        self._refresh_titles()
        self.stats_panel.clear_run()
        await self._render_conversation()
        self.query_one(ChatInput).focus()

    def action_edit_system(self) -> None:
        self.app.push_screen(SystemPromptScreen(self.conversation.system), self._system_edited)

    def _system_edited(self, text: str | None) -> None:
        if text is None:
            return
        self.conversation.system = text
        self.query_one(SystemBanner).set_prompt(text)
        self.chat_app.save(self.conversation)

    def action_copy_code(self) -> None:
        """Copy the newest code block; pressing again walks back through older ones."""
        texts = [m["content"] for m in self.conversation.messages if m["role"] == "assistant"]
        if self.request is not None:
            texts.append(self.request.view.content_text)
        blocks = [b for text in texts for b in code_blocks(text)]
        if not blocks:
            self.notify("No code block to copy yet.", timeout=2)
            return
        n = len(blocks)
        self._copy_cursor = n - 1 if self._copy_cursor is None else (self._copy_cursor - 1) % n
        lang, code = blocks[self._copy_cursor]
        self.app.copy_to_clipboard(code)
        lines = code.count("\n") + 1
        self.notify(f"Copied code block {self._copy_cursor + 1} of {n} ({lang or 'text'}, {lines} lines)", timeout=2)

    def action_fold_thinking(self) -> None:
        for view in reversed(list(self.transcript.query(AssistantMessage))):
            if view.thinking_text:
                view.thinking_block.collapsed = not view.thinking_block.collapsed
                return
        self.notify("No thinking to fold.", timeout=2)

    def action_toggle_sidebar(self) -> None:
        visible = self.query_one("#sidebar").display
        self.set_class(not visible, "-sidebar-on")
        self.set_class(visible, "-sidebar-off")

    def action_toggle_keys(self) -> None:
        """F1: the keys panel with the chat's own keys first (see KeysPanel); F1 again hides it."""
        panels = self.app.screen.query("HelpPanel")
        if panels:
            panels.remove()
        else:
            self.app.screen.mount(KeysPanel())


def tool_call_markdown(call: dict[str, Any]) -> str:
    """A tool call as the reply view shows it, after the reply's text (streamed and restored alike)."""
    import json

    return f"\n\n**tool call** `{call['name']}`\n```json\n{json.dumps(call.get('arguments', {}), ensure_ascii=False, indent=2)}\n```\n"


# ---- the app ------------------------------------------------------------------------------------------
class ChatApp(App[int]):
    """The chat app. Test hooks (not user options): `model`, `loader`, `logits_processor`, `memory_probe`."""

    TITLE = "localglm chat"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(
        self,
        options: ChatOptions | None = None,
        *,
        data_dir: Path | str | None = None,
        model: Any = None,
        loader: Loader | None = None,
        logits_processor: Callable[..., Any] | None = None,
        memory_probe: MemoryProbe | None = None,
        memory_interval: float = 1.0,
    ) -> None:
        super().__init__()
        self.options = options or ChatOptions()
        self.model = model
        self.loader = loader or default_loader(self.options)
        self.logits_processor = logits_processor
        self.memory_probe = memory_probe or probe_memory
        self.memory_interval = memory_interval
        self.store = ConversationStore(data_dir)
        self.thinking = self.options.thinking
        self.error_message: str | None = None
        self._quitting = threading.Event()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if isinstance(screen, ChatScreen):
            yield SystemCommand("New chat", "Start an empty conversation (Ctrl+N)", screen.action_new_chat)
            yield SystemCommand("Open a saved chat", "List saved conversations (Ctrl+O)", screen.action_open_chats)
            yield SystemCommand("Regenerate", "Write the last reply again (Ctrl+R)", screen.action_regenerate)
            yield SystemCommand("Thinking on/off", "Toggle the model's thinking (Ctrl+T)", screen.action_toggle_thinking)
            yield SystemCommand("System prompt", "Edit this chat's system prompt (Ctrl+S)", screen.action_edit_system)
            yield SystemCommand("Copy code block", "Copy the newest code block; again for older ones (Ctrl+B)", screen.action_copy_code)

    def on_mount(self) -> None:
        if self.model is not None:
            self.push_screen(ChatScreen(self.model))
        else:
            self.push_screen(LoadingScreen(self.options.model_label, str(self.options.device)))
            self._load()

    # ---- loading ---------------------------------------------------------------------------------
    @work(thread=True, group="load", exit_on_error=True)
    def _load(self) -> None:
        last: list[tuple[str, int, int]] = []

        def progress(stage: str, done: int, total: int) -> None:
            if self._quitting.is_set():
                raise LoadAborted
            if not last or last[0] != (stage, done, total):  # repeats would only cost redraws
                last[:] = [(stage, done, total)]
                self._post(LoadProgress(stage, done, total))

        try:
            model = self.loader(progress)
        except LoadAborted:
            return
        except LocalGLMError as exc:
            hint = HINT_DEFAULT if self.options.model_path is None else HINT_PATH
            self._post(LoadFailed(str(exc), hint))
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            self._post(LoadFailed(f"out of memory while loading the weights: {exc}".splitlines()[0], HINT_FIT))
        else:
            self._post(LoadFinished(model))

    def _post(self, message: Message) -> None:
        try:
            self.post_message(message)
        except RuntimeError:
            pass

    def on_load_progress(self, message: LoadProgress) -> None:
        if isinstance(self.screen, LoadingScreen):
            self.screen.set_progress(message.stage, message.done, message.total)

    def on_load_finished(self, message: LoadFinished) -> None:
        self.model = message.model
        self.switch_screen(ChatScreen(message.model))

    def on_load_failed(self, message: LoadFailed) -> None:
        self.error_message = message.message
        self.switch_screen(ErrorScreen(message.message, message.hint))

    # ---- saving ----------------------------------------------------------------------------------
    def save(self, conv: Conversation) -> None:
        try:
            self.store.save(conv)
        except OSError as exc:
            self.notify(f"Could not save the conversation in {self.store.root}: {exc}", severity="error")

    # ---- quitting --------------------------------------------------------------------------------
    def stop_everything(self) -> None:
        """Ask the model threads to end: the load at its next layer, a generation at its next token."""
        self._quitting.set()
        for screen in self.screen_stack:
            if isinstance(screen, ChatScreen):
                screen.abandon_generation()

    async def action_quit(self) -> None:
        self.stop_everything()
        self.exit(return_code=2 if self.error_message else 0)

    def on_unmount(self) -> None:
        self.stop_everything()

    def keep_chats(self) -> str | None:
        """After the app ends: with --cache-dir, write the live cache and the chats set aside to disk
        (Model.keep_prompts waits for a generation still ending); what is there, or None without it."""
        store = getattr(self.model, "prompt_cache", None) if self.model is not None else None
        if store is None or store.disk is None:
            return None
        self.model.keep_prompts()
        return f"{store.disk.describe()} for the next start"
