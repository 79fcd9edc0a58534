"""Reading a request's JSON body, bounded in size, time and kind.

- Only `Content-Type: application/json` (415 otherwise): a web page can POST `text/plain` or a form
  to localhost without asking, but a JSON POST needs a CORS preflight this server never grants, so
  no page the user visits can drive the model (CSRF).
- The size cap is checked as the bytes arrive, chunked bodies included, so a 413 comes as soon as
  the cap is passed and the rest is never buffered; the whole body must arrive within a deadline
  (408). Both close the connection, since the rest of the body was not read. A body declared too
  large by at most DRAIN_BYTES is read and dropped first (within the same deadline): a client that
  sends its whole body before reading (Python's http.client) otherwise meets a reset, not the 413.
- A client that disconnects mid-upload ends the request quietly (499), without a traceback.
- Lone UTF-16 surrogates in JSON string escapes (`"\\ud800"`) are replaced by U+FFFD before
  parsing: they are legal JSON, and what a client sends when it cuts an emoji in half by UTF-16
  length (agents truncating tool output do); refusing them would wedge a conversation whose
  history holds one, and the tokenizer cannot take them as they are.
- A big body is parsed in a worker thread, not on the event loop.
"""

from __future__ import annotations

import re
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from .errors import CLOSE, APIError, bad_request
from .validation import body_object, load_json

JSON_MEDIA_TYPE = "application/json"
PARSE_IN_THREAD_BYTES = 1 << 20
DRAIN_BYTES = 64 << 20  # how far past the cap a declared body is read and dropped before its 413
BODY_BYTES_KEY = "localglm.body_bytes"  # in scope["state"]: how big the body was (the app trims memory after big ones)

# A lone surrogate escape, or an escaped backslash / a valid pair (matched so they are kept whole).
_SURROGATE_ESCAPE = re.compile(rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}(?:\\u[dD][c-fC-F][0-9a-fA-F]{2})?|\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_content_type(request: Request) -> None:
    """415 unless the body is declared JSON (parameters such as charset are fine) and not compressed."""
    given = request.headers.get("content-type")
    if (given or "").split(";", 1)[0].strip().lower() != JSON_MEDIA_TYPE:
        got = f"got {given!r}" if given else "got none"
        raise APIError(
            415,
            f"Content-Type must be application/json ({got}); with curl add -H 'Content-Type: application/json'",
            headers=CLOSE,
        )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # read as JSON text it would be a misleading "not UTF-8 text"
        raise APIError(415, f"Content-Encoding {encoding!r} is not supported: send the body uncompressed", headers=CLOSE)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit` bytes or (408) when it takes over `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        if int(declared) - limit <= DRAIN_BYTES:
            await _drain(request, timeout_s)
        raise _too_large(int(declared), limit)
    body = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise _too_large(None, limit)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", headers=CLOSE) from None
    except ClientDisconnect:
        raise APIError(499, "the client disconnected while sending the request") from None
    request.scope.setdefault("state", {})[BODY_BYTES_KEY] = len(body)
    return bytes(body)


async def _drain(request: Request, timeout_s: float) -> None:
    """Read and drop the body, for at most `timeout_s` (the 413 follows either way)."""
    with anyio.move_on_after(timeout_s):
        try:
            async for _ in request.stream():
                pass
        except ClientDisconnect:
            pass


def _too_large(size: int | None, limit: int) -> APIError:
    what = f"is {size} bytes" if size is not None else f"passed {limit} bytes"
    return APIError(413, f"request body {what}, the limit is {limit} (serve --max-body raises it)", headers=CLOSE)


def replace_lone_surrogates(body: bytes) -> bytes:
    """JSON text with each lone surrogate escape (\\ud800 without its pair) written as \\ufffd."""
    if not _MAYBE_SURROGATE.search(body):
        return body

    def fix(m: re.Match[bytes]) -> bytes:
        text = m.group(0)
        return text if text == b"\\\\" or len(text) == 12 else b"\\ufffd"

    return _SURROGATE_ESCAPE.sub(fix, body)


def parse_json(body: bytes) -> Any:
    """The JSON value of `body`; a 400 naming the problem otherwise."""
    if not body.strip():
        raise bad_request("request body is empty: expected a JSON object")
    return load_json(replace_lone_surrogates(body), "request body")


async def read_json(request: Request, limit: int, timeout_s: float) -> dict[str, Any]:
    """The request's JSON object (415 / 413 / 408 / 400 raised here)."""
    check_content_type(request)
    body = await read_body(request, limit, timeout_s)
    data = await run_in_threadpool(parse_json, body) if len(body) > PARSE_IN_THREAD_BYTES else parse_json(body)
    return body_object(data)
