"""Server-sent events, and noticing a client that went away.

`EventStreamResponse` streams `text/event-stream` chunks while a second task listens for the
ASGI `http.disconnect` message; a disconnect cancels the stream at once (whatever the ASGI spec
version the server reports, and even while the generation has produced nothing yet), and the
route's generator, closed by that cancellation, cancels its engine job. `until_disconnect` does
the same for non-streaming requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # tell reverse proxies not to buffer the stream
}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj: Any) -> str:
    """An unnamed event (OpenAI streams)."""
    return f"data: {dumps(obj)}\n\n"


def sse_event(name: str, obj: Any) -> str:
    """A named event (Anthropic streams)."""
    return f"event: {name}\ndata: {dumps(obj)}\n\n"


class EventStreamResponse:
    """Stream `chunks` as SSE; cancel it (and close `chunks`) as soon as the client disconnects."""

    def __init__(self, chunks: AsyncIterator[str], headers: dict[str, str] | None = None, media_type: str = "text/event-stream") -> None:
        self.chunks = chunks
        self.media_type = media_type  # Ollama's routes stream newline-delimited JSON the same way
        self.headers = {**SSE_HEADERS, **(headers or {})}
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(b"content-type", f"{self.media_type}; charset=utf-8".encode("latin-1"))]
        raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        try:
            async with anyio.create_task_group() as tg:

                async def listen() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            self.disconnected = True
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(listen)
                await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.chunks.aclose()  # runs the route's cleanup (job cancel) in every case


async def until_disconnect(receive: Receive, work: Callable[[], Awaitable[Any]], on_disconnect: Callable[[], None]) -> Any:
    """Await `work()`; if the client disconnects first, call `on_disconnect` and return None."""
    result: list[Any] = []
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            try:
                result.append(await work())
            except Exception as exc:  # re-raised below as itself, not wrapped in an ExceptionGroup
                errors.append(exc)
            tg.cancel_scope.cancel()

        async def listen() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    on_disconnect()
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(run)
        tg.start_soon(listen)
    if errors:
        raise errors[0]
    return result[0] if result else None
