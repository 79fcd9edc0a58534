"""Saved conversations: one JSON file per chat under the user's data directory.

On Linux that is `$XDG_DATA_HOME/localglm/conversations` (default `~/.local/share/...`); other
systems get their platform's equivalent from platformdirs. Files are written atomically (temp file
+ rename), so a crash never leaves half a conversation; unreadable files are skipped when listing.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
TITLE_CHARS = 60
LATEST_TIME = 253402300799.0  # 9999-12-31: the last time time.localtime and strftime can show


def default_data_dir() -> Path:
    """Where conversations are saved: the user data dir (honours XDG_DATA_HOME on Linux)."""
    import platformdirs

    return platformdirs.user_data_path("localglm") / "conversations"


def new_conversation_id(now: float | None = None) -> str:
    """Sortable and unique: creation time plus a random suffix."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{stamp}-{secrets.token_hex(3)}"


def make_title(text: str) -> str:
    """A one-line title from the first user message."""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


@dataclass
class Conversation:
    """A chat: its system prompt and turns, as the model sees them (plus a few display fields).

    `messages` holds {"role": "user" | "assistant", "content": str} dicts; assistant turns may carry
    "reasoning_content" (the thinking), "tool_calls" ([{"name", "arguments"}]) and "finish_reason".
    """

    id: str = field(default_factory=new_conversation_id)
    title: str = ""
    system: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    thinking: bool = True
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    # ---- turns -----------------------------------------------------------------------------------
    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        if not self.title:
            self.title = make_title(text)

    def add_assistant(
        self,
        content: str,
        thinking: str = "",
        tool_calls: list[dict[str, Any]] | None = None,
        finish_reason: str = "",
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            msg["reasoning_content"] = thinking
        if tool_calls:
            msg["tool_calls"] = tool_calls
        if finish_reason:
            msg["finish_reason"] = finish_reason
        self.messages.append(msg)
        return msg

    def drop_last_reply(self) -> dict[str, Any] | None:
        """Remove the last assistant turn (to regenerate it); None if the chat does not end with one."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages.pop()
        return None

    def drop_last_user(self) -> str | None:
        """Remove a trailing user turn (its generation failed); returns its text."""
        if self.messages and self.messages[-1]["role"] == "user":
            return self.messages.pop()["content"]
        return None

    @property
    def ends_with_user(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "user"

    def model_messages(self) -> list[dict[str, Any]]:
        """The messages to send to `Model.generate`: system prompt first, display-only keys dropped."""
        out: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system.strip() else []
        for m in self.messages:
            msg = {k: v for k, v in m.items() if k in ("role", "content", "reasoning_content")}
            if m.get("tool_calls"):
                msg["tool_calls"] = [{"name": c["name"], "arguments": c.get("arguments", {})} for c in m["tool_calls"]]
            out.append(msg)
        return out

    # ---- JSON ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValueError("not a localglm conversation")
        messages = []
        for m in data["messages"]:
            if not valid_message(m):
                raise ValueError("malformed message")
            messages.append(m)
        return cls(
            id=str(data.get("id") or new_conversation_id()),
            title=str(data.get("title", "")),
            system=str(data.get("system", "")),
            messages=messages,
            model=str(data.get("model", "")),
            thinking=bool(data.get("thinking", True)),
            created=saved_time(data.get("created")),
            updated=saved_time(data.get("updated")),
        )


def valid_message(m: Any) -> bool:
    """A turn the app can show and send back. A hand-edited or corrupt file may hold anything, and a
    wrong type in thinking, finish reason or tool calls would otherwise crash the chat when opened."""
    if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
        return False
    if not isinstance(m.get("reasoning_content", ""), str) or not isinstance(m.get("finish_reason", ""), str):
        return False
    calls = m.get("tool_calls", [])
    return isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments", {}), dict) for c in calls
    )


def saved_time(value: Any) -> float:
    """A saved timestamp the conversation list can format: NaN, 1e300 or a string reads as 0 (1970),
    rather than making time.localtime raise when the list is shown."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        return 0.0
    return t if 0.0 <= t <= LATEST_TIME else 0.0


def read_conversation(path: Path) -> Conversation:
    """Parse one saved file; every way it can be malformed is a ValueError (or OSError when unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # absurdly deep nesting: json's parser gives up
        raise ValueError("nested too deeply") from None
    return Conversation.from_json(data)


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    updated: float
    turns: int
    path: Path


class ConversationStore:
    """Reads and writes conversations as `<root>/<id>.json`."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_data_dir()

    def path_for(self, conv_id: str) -> Path:
        if not conv_id or "/" in conv_id or "\\" in conv_id or conv_id.startswith("."):
            raise ValueError(f"bad conversation id {conv_id!r}")
        return self.root / f"{conv_id}.json"

    def save(self, conv: Conversation) -> Path:
        """Write `conv` atomically (nothing is written for a chat with no turns)."""
        path = self.path_for(conv.id)
        if not conv.messages:
            return path
        conv.updated = time.time()
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{conv.id}.", suffix=".tmp", dir=self.root)
        try:
            # backslashreplace: a lone surrogate (pasted, or a --system argument's undecodable byte) is
            # written as its JSON escape \udXXX, which loads back as the same string; strict UTF-8 would crash.
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                json.dump(conv.to_json(), f, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load(self, conv_id: str) -> Conversation:
        path = self.path_for(conv_id)
        conv = read_conversation(path)
        conv.id = conv_id  # the file name wins: saving writes back to the same file
        return conv

    def delete(self, conv_id: str) -> None:
        self.path_for(conv_id).unlink(missing_ok=True)

    def list(self) -> list[ConversationSummary]:
        """Saved conversations, most recently updated first; unreadable files are skipped."""
        out = []
        if not self.root.is_dir():
            return out
        for path in self.root.glob("*.json"):
            try:
                conv = read_conversation(path)
            except (OSError, ValueError):
                continue
            out.append(ConversationSummary(path.stem, conv.title or "(untitled)", conv.updated, len(conv.messages), path))
        out.sort(key=lambda s: (s.updated, s.id), reverse=True)
        return out
