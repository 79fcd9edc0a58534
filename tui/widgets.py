"""The chat's widgets: the input box, the messages (with streaming Markdown), the stats panels, the F1 keys panel."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.events import Click, Key
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Collapsible, HelpPanel, KeyPanel, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownFence, MarkdownStream

from .metrics import (
    LiveRate,
    MemoryInfo,
    bar,
    fmt_bytes,
    fmt_percent,
    fmt_rate,
    fmt_seconds,
    heat_strip,
)

# How a finished generation's `finish_reason` reads in the stats panel.
STATES = {"stop": "done", "stop_string": "done", "length": "cut off", "cancelled": "stopped"}

NOTES = {
    "cancelled": "(stopped)",
    "length": "(cut off: max tokens or context full)",
    "stop_string": "",
    "stop": "",
}


# ---- input -------------------------------------------------------------------------------------------
class ChatInput(TextArea):
    """Multi-line prompt box: Enter sends, Shift+Enter (or Ctrl+J, Alt+Enter) starts a new line."""

    HELP = "The prompt box: **Enter** sends, **Shift+Enter** or **Ctrl+J** starts a new line."

    DEFAULT_CSS = """
    ChatInput {
        height: auto;
        min-height: 3;
        max-height: 10;
        border: round $primary 50%;
        &:focus { border: round $primary; }
    }
    """

    BINDINGS = [
        Binding("shift+enter,ctrl+j,alt+enter", "newline", "New line", show=False),
    ]

    class Submitted(Message):
        """The user pressed Enter with some text in the box."""

        def __init__(self, chat_input: ChatInput, text: str) -> None:
            super().__init__()
            self.chat_input = chat_input
            self.text = text

        @property
        def control(self) -> ChatInput:
            return self.chat_input

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("placeholder", "Message (Enter sends, Shift+Enter or Ctrl+J for a new line)")
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self, self.text))
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        start, end = self.selection
        self.replace("\n", start, end, maintain_selection_offset=False)


# ---- markdown with copyable code blocks ---------------------------------------------------------------
class CopyableFence(MarkdownFence):
    """A highlighted code block; clicking it copies the code to the clipboard."""

    def on_click(self, event: Click) -> None:
        event.stop()
        self.app.copy_to_clipboard(self.code)
        lines = self.code.count("\n") + 1
        self.app.notify(f"Copied code block ({self.lexer or 'text'}, {lines} lines)", timeout=2)


class ChatMarkdown(Markdown):
    BLOCKS = {**Markdown.BLOCKS, "fence": CopyableFence, "code_block": CopyableFence}

    DEFAULT_CSS = """
    ChatMarkdown {
        margin: 0;
        padding: 0;
        background: transparent;
        & > MarkdownParagraph { margin: 0 0 1 0; }
        & > *:last-child { margin-bottom: 0; }
    }
    """


# ---- messages ------------------------------------------------------------------------------------------
class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage {
        margin: 1 8 0 0;
        padding: 0 1;
        border-left: thick $accent;
        background: $boost;
    }
    """

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False, classes="message")
        self.text = text


class SystemBanner(Static):
    """The conversation's system prompt, shown dimmed at the top of the transcript."""

    DEFAULT_CSS = """
    SystemBanner {
        margin: 0 0 0 0;
        padding: 0 1;
        color: $text-muted;
        border-left: thick $secondary 50%;
    }
    """

    def set_prompt(self, text: str) -> None:
        self.display = bool(text.strip())
        self.update(Text.assemble(("system: ", "bold"), text.strip()))


class ThinkingBlock(Collapsible):
    DEFAULT_CSS = """
    ThinkingBlock {
        border: none;
        padding: 0;
        margin: 0 0 1 0;
        background: transparent;
        color: $text-muted;
        & > Contents { padding: 0 0 0 2; }
        & ChatMarkdown { color: $text-muted; }
    }
    """


class AssistantMessage(Vertical):
    """One reply: a collapsible thinking block, the answer as Markdown, and a short note."""

    DEFAULT_CSS = """
    AssistantMessage {
        height: auto;
        margin: 1 0 0 0;
        padding: 0 1;
        border-left: thick $success 60%;
        & > .note { color: $text-muted; text-style: italic; }
    }
    """

    def __init__(
        self, thinking: str = "", content: str = "", note: str = "", *, streaming: bool = False, auto_fold: bool = True
    ) -> None:
        super().__init__(classes="message")
        self.streaming = streaming
        self.auto_fold = auto_fold
        self.thinking_text = thinking
        self.content_text = content
        self._note = note if not streaming else "generating…"
        self._streams: dict[str, MarkdownStream] = {}

    def compose(self) -> ComposeResult:
        block = ThinkingBlock(
            ChatMarkdown(self.thinking_text, classes="thinking-text"),
            title="Thinking…" if self.streaming else "Thinking",
            collapsed=not self.streaming,
        )
        block.display = bool(self.thinking_text)
        yield block
        yield ChatMarkdown(self.content_text, classes="content")
        note = Static(self._note, markup=False, classes="note")
        note.display = bool(self._note)
        yield note

    @property
    def thinking_block(self) -> ThinkingBlock:
        return self.query_one(ThinkingBlock)

    def set_note(self, text: str) -> None:
        note = self.query_one(".note", Static)
        note.update(text)
        note.display = bool(text)

    def _stream(self, kind: str) -> MarkdownStream:
        if kind not in self._streams:
            target = self.query_one(".thinking-text" if kind == "thinking" else ".content", ChatMarkdown)
            self._streams[kind] = Markdown.get_stream(target)
        return self._streams[kind]

    async def add_thinking(self, text: str) -> None:
        if not self.thinking_text:
            self.set_note("")
            block = self.thinking_block
            block.display = True
            block.collapsed = False
        self.thinking_text += text
        await self._stream("thinking").write(text)

    async def add_content(self, text: str) -> None:
        if not self.content_text:
            self.set_note("")
            if self.thinking_text:
                block = self.thinking_block
                block.title = "Thinking"
                if self.auto_fold:
                    block.collapsed = True
        self.content_text += text
        await self._stream("content").write(text)

    async def finish(self, note: str = "") -> None:
        """The reply is complete: flush the streams and show why it ended, if it matters."""
        for stream in self._streams.values():
            await stream.stop()
        self._streams.clear()
        self.streaming = False
        if self.thinking_text:
            self.thinking_block.title = "Thinking"
        self.set_note(note)


# ---- stats ---------------------------------------------------------------------------------------------
class StatsPanel(Static):
    """Prefill and decode speed, time to first token, context use, RAM and VRAM."""

    DEFAULT_CSS = """
    StatsPanel {
        border: round $primary 40%;
        border-title-color: $text-primary;
        padding: 0 1;
        height: auto;
    }
    """

    GAUGE = 30

    def __init__(self, ctx_limit: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = "Stats"
        self.ctx_limit = ctx_limit
        self.prefill_tok_s: float | None = None
        self.decode_tok_s: float | None = None
        self.ttft_s: float | None = None
        self.prompt_tokens: int | None = None
        self.cached_tokens = 0
        self.decode_tokens: int | None = None
        self.mtp: tuple[int, int, float] | None = None  # speculative decoding: (drafted, accepted, tokens per step)
        self.memory: MemoryInfo | None = None
        self.state = "idle"

    def on_mount(self) -> None:
        self.redraw()

    # -- inputs --
    def show_final(self, stats: Any) -> None:
        """Take the exact figures from a finished generation's `GenerationStats`."""
        self.prefill_tok_s = stats.prompt_tok_s
        self.decode_tok_s = stats.decode_tok_s
        self.ttft_s = stats.ttft_s
        self.prompt_tokens = stats.prompt_tokens
        self.cached_tokens = stats.cached_prompt_tokens
        self.decode_tokens = stats.decode_tokens
        self.mtp = (stats.draft_tokens, stats.accepted_tokens, stats.acceptance_length) if stats.draft_depths else None
        self.state = STATES.get(stats.finish_reason, stats.finish_reason or "idle")
        self.redraw()

    def start_live(self, prompt_tokens: int | None) -> None:
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.prefill_tok_s = self.decode_tok_s = self.ttft_s = None
        self.decode_tokens = 0
        self.state = "prefill"
        self.redraw()

    def show_prefill(self, seconds: float) -> None:
        """The prompt has been processed (the first token is being sampled): show its speed and the time to
        the first token now, not when the reply ends. An estimate until then: a reused prefix counts as
        processed here, and the exact figures from the finished run replace these."""
        self.ttft_s = seconds
        if self.prompt_tokens and seconds > 0:
            self.prefill_tok_s = self.prompt_tokens / seconds
        if self.state != "stopping":
            self.state = "decoding"
        self.redraw()

    def show_live(self, rate: LiveRate) -> None:
        if self.ttft_s is None:
            self.ttft_s = rate.ttft_s
        self.decode_tok_s = rate.decode_tok_s
        self.decode_tokens = rate.tokens
        if self.state != "stopping":
            self.state = "decoding" if rate.tokens or self.prefill_tok_s is not None else "prefill"
        self.redraw()

    def show_memory(self, memory: MemoryInfo) -> None:
        self.memory = memory
        self.redraw()

    def clear_run(self) -> None:
        """A new or reloaded chat: forget the last run's numbers."""
        self.prefill_tok_s = self.decode_tok_s = self.ttft_s = None
        self.prompt_tokens = self.decode_tokens = None
        self.cached_tokens = 0
        self.mtp = None
        self.state = "idle"
        self.redraw()

    # -- view --
    @property
    def ctx_used(self) -> int | None:
        if self.prompt_tokens is None:
            return None
        return self.prompt_tokens + (self.decode_tokens or 0)

    def redraw(self) -> None:
        def grid() -> Table:
            t = Table.grid(padding=(0, 1), expand=True)
            t.add_column(style="dim", no_wrap=True)
            t.add_column(justify="right", no_wrap=True, overflow="ellipsis")
            return t

        speed = grid()
        speed.add_row(Text("speed", style="bold"), Text(self.state, style="italic"))
        speed.add_row("prefill", fmt_rate(self.prefill_tok_s))
        speed.add_row("decode", fmt_rate(self.decode_tok_s))
        speed.add_row("first token", fmt_seconds(self.ttft_s))
        speed.add_row("generated", "—" if self.decode_tokens is None else f"{self.decode_tokens} tok")
        if self.mtp is not None:  # the MTP head drafted: how many it got right, tokens per verification
            drafted, accepted, per_step = self.mtp
            speed.add_row("drafts", f"{accepted}/{drafted} accepted")
            speed.add_row("per step", f"{per_step:.2f} tok")

        context = grid()
        context.add_row(Text("context", style="bold"), "")
        used = self.ctx_used
        gauge = Text("")
        if used is None:
            context.add_row("used", f"— / {self.ctx_limit}")
        else:
            fraction = used / self.ctx_limit if self.ctx_limit else 0.0
            context.add_row("used", f"{used} / {self.ctx_limit} ({100 * fraction:.0f}%)")
            if self.cached_tokens:
                context.add_row("reused", f"{self.cached_tokens} tok")
            style = "red" if fraction > 0.9 else "yellow" if fraction > 0.7 else "green"
            gauge = Text(bar(fraction, self.GAUGE), style=style, no_wrap=True)

        memory = grid()
        memory.add_row(Text("memory", style="bold"), "")
        mem = self.memory
        if mem is None:
            memory.add_row("RAM", "—")
            memory.add_row("VRAM", "—")
        else:
            memory.add_row("RAM", f"{fmt_bytes(mem.ram_used)} of {fmt_bytes(mem.ram_total)}")
            vram = "—" if mem.vram_used is None else f"{fmt_bytes(mem.vram_used)} of {fmt_bytes(mem.vram_total)}"
            memory.add_row("VRAM", vram)
        parts: list[Any] = [speed, Text(""), context]
        if gauge.plain:
            parts.append(gauge)
        parts += [Text(""), memory]
        self.update(Group(*parts))


class ExpertPanel(Static):
    """Expert-cache hit rate and a per-layer heat strip of expert use; hidden unless the backend reports them."""

    DEFAULT_CSS = """
    ExpertPanel {
        border: round $warning 40%;
        border-title-color: $text-warning;
        padding: 0 1;
        height: auto;
    }
    """

    STRIP_WIDTH = 24
    KNOWN = ("hit_rate", "layer_heat")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = "Experts"
        self.display = False
        self.backend: dict[str, Any] = {}

    def show_backend(self, backend: dict[str, Any] | None) -> None:
        backend = backend or {}
        self.backend = backend
        if not any(k in backend for k in self.KNOWN):
            self.display = False
            return
        parts: list[Any] = []
        grid = Table.grid(padding=(0, 1), expand=True)
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(justify="right", no_wrap=True)
        if "hit_rate" in backend:
            try:
                grid.add_row("cache hit rate", fmt_percent(float(backend["hit_rate"])))
            except (TypeError, ValueError):
                pass
        for key, value in backend.items():  # other scalar counters the backend chooses to report
            if key in self.KNOWN or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            text = fmt_bytes(int(value)) if "bytes" in key else (f"{value:.3g}" if isinstance(value, float) else str(value))
            grid.add_row(key.replace("_", " "), text)
        parts.append(grid)
        heat = backend.get("layer_heat")
        if isinstance(heat, (list, tuple)) and heat:
            rows = [list(r) for r in heat if isinstance(r, (list, tuple))]
            parts.append(Text("\nexpert use per layer", style="bold"))
            parts.append(heat_strip(rows, self.STRIP_WIDTH))
        self.update(Group(*parts))
        self.display = True


# ---- F1: keys ---------------------------------------------------------------------------------------------
class ChatKeysTable(Static):
    """The keys of the focused widget's chain in three groups: the chat's own (Enter, and what the chat
    screen, the app and the prompt box declare themselves), then general ones (focus, copy), then the
    editing keys the prompt box inherits from TextArea.

    Why not Textual's table: it lists the focused widget first, and a TextArea has some 35 editing
    keys, which pushed the chat's own keys below row 45 where nobody looks."""

    DEFAULT_CSS = """
    ChatKeysTable { width: auto; height: auto; }
    """

    def render(self) -> Table:
        groups: dict[str, dict[tuple[int, str], list[Binding]]] = {"chat": {}, "general": {}, "editing the prompt": {}}
        for active in self.screen.active_bindings.values():
            node, binding = active.node, active.binding
            if binding.system:
                continue
            declared = type(node).__dict__.get("BINDINGS", [])  # what the node's own class adds, not what it inherits
            if any(getattr(b, "action", None) == binding.action for b in declared):
                group = "chat"
            else:
                group = "general" if isinstance(node, (Screen, App)) else "editing the prompt"
            groups[group].setdefault((id(node), binding.action), []).append(binding)
        table = Table.grid(padding=(0, 1))
        table.add_column(justify="right", style="bold")
        table.add_column()
        table.add_row("", Text("chat", style="underline"))
        table.add_row("enter", "Send the message")
        for title, group in groups.items():
            if title != "chat" and group:
                table.add_row("", "")
                table.add_row("", Text(title, style="underline"))
            for bindings in group.values():
                keys = " ".join(dict.fromkeys(self.app.get_key_display(b) for b in bindings))
                table.add_row(keys, bindings[0].description or bindings[0].action)
        return table


class ChatKeyPanel(KeyPanel):
    """Textual's key panel (refreshed when bindings change), showing `ChatKeysTable`."""

    def compose(self) -> ComposeResult:
        yield ChatKeysTable()


class KeysPanel(HelpPanel):
    """What F1 shows: the focused widget's help, then every key with the chat's own first."""

    def compose(self) -> ComposeResult:
        yield Markdown(id="widget-help")
        yield ChatKeyPanel(id="keys-help")
