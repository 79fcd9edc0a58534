"""Helpers for tests and benchmarks: a real server in a thread, and forced ("scripted") model output.

`ServerThread` runs the app on a free loopback port in a background thread, built as `localglm
serve` builds it (`http.build_server`: the real HTTP stack and connection limits, so the official
clients can talk to it). `ScriptedOutput` is a `logits_processor_hook` for
`create_app`: a request whose text contains `SCRIPT:<name>` makes the model emit exactly that
script's tokens, so the parser, tool-call and thinking paths run end to end through a real model.
`Push` is the soft version (a bias, not a mask) that constrained-decoding tests fight the grammar with.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..engine import LogitsProcessor, Model
from .http import build_server

_MARKER = re.compile(r"SCRIPT:([A-Za-z0-9_\-]+)")
# A GLM-4.5 tool call with two arguments, one holding a space: the call the server tests force for `read_file`.
READ_FILE_CALL = (
    "<tool_call>read_file\n<arg_key>path</arg_key>\n<arg_value>src/a b.py</arg_value>\n"
    "<arg_key>limit</arg_key>\n<arg_value>20</arg_value>\n</tool_call>"
)


@contextlib.contextmanager
def scripted_server(model: Model, model_name: str = "tiny-glm", **settings: Any) -> Iterator[tuple[ScriptedOutput, ServerThread]]:
    """The app for `model` with a `ScriptedOutput` hook, served in a thread: `(scripts, server)` for the block."""
    from .app import create_app
    from .state import ServerSettings

    scripts = ScriptedOutput(model)
    app = create_app(model, ServerSettings(model_name=model_name, **settings), logits_processor_hook=scripts)
    with ServerThread(app) as srv:
        yield scripts, srv


class ServerThread:
    """`with ServerThread(app) as srv:` serves `app` at `srv.base_url` until the block ends."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = build_server(app, timeout_graceful_shutdown=2)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Script:
    ids: list[int]
    delay_s: float = 0.0  # sleep before each token (slow generations for disconnect tests)
    gate: threading.Event | None = None  # wait for it before the first token (queue tests)
    repeat_last: bool = False  # after the script, keep forcing its last token (endless output)


class ScriptedOutput:
    """A `logits_processor_hook` forcing scripted output for requests that name a script."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.scripts: dict[str, Script] = {}
        tok = model.tokenizer
        assert tok is not None
        self.eos = tok.token_to_id("<|endoftext|>")

    def ids(self, *pieces: str | int) -> list[int]:
        """Token ids of the pieces, each tokenized on its own (so a tag can be split across tokens)."""
        out: list[int] = []
        for piece in pieces:
            out += [piece] if isinstance(piece, int) else self.model.tokenizer.encode(piece)
        return out

    def special(self, token: str) -> int:
        tid = self.model.tokenizer.token_to_id(token)
        assert tid is not None, token
        return tid

    def add(self, name: str, *pieces: str | int, end: str | None = "<|endoftext|>", **options: Any) -> list[int]:
        """Register script `name`: the pieces, then the `end` special token (None: no end token)."""
        ids = self.ids(*pieces)
        if end is not None:
            ids.append(self.special(end))
        self.scripts[name] = Script(ids=ids, **options)
        return ids

    def __call__(self, endpoint: str, body: dict[str, Any]) -> LogitsProcessor | None:
        names = _MARKER.findall(json.dumps([body.get(key) for key in ("messages", "input", "prompt")]))
        script = self.scripts.get(names[-1]) if names else None
        if script is None:
            return None
        return _forcer(script, self.eos)


class Push:
    """A soft forcer: a large bias toward `ids` in turn, then toward `end` (a model that wants to write
    them); unlike a script's hard mask, a grammar applied with it can still refuse what it pushes."""

    def __init__(self, ids: list[int], end: int, bias: float = 1000.0) -> None:
        self.ids, self.end, self.bias = ids, end, bias

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        tok = self.ids[len(history)] if len(history) < len(self.ids) else self.end
        out = logits.clone()
        out[tok] += self.bias
        return out


def _forcer(script: Script, eos: int) -> LogitsProcessor:
    def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if script.gate is not None and not generated:
            script.gate.wait(30)
        if script.delay_s:
            time.sleep(script.delay_s)
        n = len(generated)
        if n < len(script.ids):
            tok = script.ids[n]
        else:
            tok = script.ids[-1] if script.repeat_last else eos
        out = torch.full_like(logits, float("-inf"))
        out[tok] = 0.0
        return out

    return force
