"""Running the app under uvicorn with the connection limits uvicorn lacks, and a graceful shutdown.

uvicorn closes a kept-alive connection after `timeout_keep_alive` of silence, but has no deadline
for a request head: a fresh connection that never sends a byte, or one sending its headers a byte
a second (slowloris), is held forever, since any byte resets its keep-alive timer. So the h11
protocol is subclassed here to give every request head `header_timeout_s` from the moment the
connection starts waiting for it (connect, or the end of the previous reply), and to keep at most
`max_idle_connections` connections waiting at once: a new one closes the one that has waited
longest. Busy connections are capped by uvicorn's `limit_concurrency` (503 beyond it); the body
deadline is the app's (`body.read_body`), since the app reads the body.

`GracefulServer` tells the app that shutdown began (`ServerState.begin_shutdown`) before uvicorn
waits for the connections, so active streams end with a final error event instead of being cut.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from .state import ServerSettings, ServerState

_TIMEOUT_TEXT = b"the request head did not arrive in time\n"
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT)
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head and a cap on waiting connections."""

    header_timeout_s: float = 10.0
    max_idle: int = 32

    @classmethod
    def configured(cls, settings: ServerSettings) -> type[GuardedH11Protocol]:
        """This protocol with the limits of `settings` (uvicorn instantiates the class it is given)."""
        return type(cls.__name__, (cls,), {"header_timeout_s": settings.header_timeout_s, "max_idle": settings.max_idle_connections})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0
        super().connection_made(transport)
        self._await_head()
        self._close_longest_waiting()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a whole request head arrived
            self._stop_waiting()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():  # no pipelined request started
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    @property
    def waiting(self) -> bool:
        """Whether this connection waits for a request head (idle, or sending one)."""
        return self._head_timer is not None

    def _await_head(self) -> None:
        self._stop_waiting()
        self._waiting_since = time.monotonic()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: say why it is closed
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()

    def _close_longest_waiting(self) -> None:
        waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c.waiting]
        if len(waiting) > self.max_idle:
            oldest = min(waiting, key=lambda c: c._waiting_since)
            oldest._stop_waiting()
            oldest.transport.close()


class GracefulServer(uvicorn.Server):
    """uvicorn's server, telling the app that shutdown began before waiting for its connections."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    async def shutdown(self, sockets: Any = None) -> None:
        self._state.begin_shutdown()
        await super().shutdown(sockets)


def build_server(app: Starlette, *, log_level: str = "warning", access_log: bool = False, **config: Any) -> GracefulServer:
    """A uvicorn server for an app made by `create_app`, with its settings' connection limits.

    `config` is passed on to uvicorn.Config (host, port, timeout_graceful_shutdown, ...).
    """
    state: ServerState = app.state.server
    s = state.settings
    uv_config = uvicorn.Config(
        app,
        http=GuardedH11Protocol.configured(s),
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        timeout_keep_alive=s.keep_alive_s,
        limit_concurrency=s.max_connections,
        **config,
    )
    return GracefulServer(uv_config, state)
