"""The ASGI app: routes, Host and API-key checks, error shapes, request counting, engine worker lifetime.

Starlette and uvicorn do the HTTP: request parsing, keep-alive, chunked streaming, the ASGI
disconnect message our cancellation relies on, and graceful shutdown. They are small, widely
deployed and far more robust against real clients than an HTTP server of our own would be; the
model-facing logic (queue, streaming events, the two APIs) stays ours. `localglm.server.http`
runs the app under uvicorn with the connection limits uvicorn lacks.

The Host check defends against DNS rebinding: a web page whose name the attacker re-points at
127.0.0.1 reaches this server with its own name in Host. Browsers send the name they connected to,
so accepting localhost names and IP literals (a page cannot make the browser send those for its own
origin) plus the names the user allows (--allow-host) keeps such pages out, on any bind address.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import Model
from . import anthropic_routes, ollama_routes, openai_routes, responses_routes
from .body import BODY_BYTES_KEY
from .errors import CLOSE, APIError, error_body
from .metrics import Metrics
from .state import LogitsProcessorHook, ServerSettings, ServerState
from .worker import EngineWorker

log = logging.getLogger("localglm.server")

PUBLIC_PATHS = ("/health", "/")
KNOWN_ENDPOINTS = (
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages", "/v1/messages/count_tokens",
    "/v1/responses", "/v1/responses/input_tokens", "/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps",
    "/api/version", "/health", "/metrics",
)  # fmt: skip


def _endpoint_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/v1/responses/") and path not in KNOWN_ENDPOINTS:
        return "/v1/responses/{id}"
    return path if path in KNOWN_ENDPOINTS else "other"


TRIM_AFTER_BYTES = 1 << 20  # after a request body this big, give freed memory back to the OS


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS, Windows).

    Parsing and tokenizing a big prompt allocates hundreds of MB in many small blocks; glibc keeps
    them after they are freed (RSS stayed ~5 GB after one 50 MB body), malloc_trim returns them.
    """
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def host_name(header: str) -> str:
    """The name in a Host header: port dropped, IPv6 brackets removed, lowercase, no trailing dot."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")].lower() if "]" in header else header.lower()
    return header.rsplit(":", 1)[0].lower().rstrip(".")


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request with this Host header may be served (see the module docstring)."""
    if not header:  # HTTP/1.0 without Host: not a browser
        return True
    name = host_name(header)
    if name == "localhost" or name.endswith(".localhost") or "*" in allowed or name in allowed:
        return True
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


class GuardMiddleware:
    """Checks the Host header and the API key (Bearer or x-api-key), counts every response by endpoint
    and status, answers an unexpected error with one logged 500 (keeping the connection), and gives
    memory back after big requests."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.allowed_hosts = frozenset(host_name(h) if h != "*" else h for h in state.settings.allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status = 0

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            err = self._refusal(scope, path)
            if err is not None:
                await JSONResponse(error_body(err, path), status_code=err.status, headers=err.headers)(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
            trim = _malloc_trim()
            if trim is not None and scope.get("state", {}).get(BODY_BYTES_KEY, 0) >= TRIM_AFTER_BYTES:
                await anyio.to_thread.run_sync(trim, 0)
        except Exception as exc:  # a bug: one log entry; a JSON 500 if nothing was sent yet
            log.exception("%s %s failed", scope.get("method"), path, exc_info=exc)
            if status == 0:
                err = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
                await JSONResponse(error_body(err, path), status_code=500)(scope, receive, counting_send)
        finally:
            self.state.metrics.count_request(_endpoint_label(path), status or 500)

    def _refusal(self, scope: Scope, path: str) -> APIError | None:
        """The 403 / 401 a request gets before it reaches a route, if any."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if not host_allowed(host, self.allowed_hosts):
            name = host_name(host or "")
            return APIError(
                403,
                f"Host {name!r} is not allowed (DNS-rebinding protection): connect through localhost or an IP "
                f"address, or restart the server with --allow-host {name}",
                headers=CLOSE,
            )
        key = self.state.settings.api_key
        if key and path not in PUBLIC_PATHS and not _authorized(headers, key):
            return APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'")
        return None


def _authorized(headers: dict[str, str], key: str) -> bool:
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse(
        {
            "status": "ok",
            "model": state.settings.model_name,
            "ctx": state.model.ctx,
            "busy": state.worker.busy,
            "queue_waiting": state.worker.waiting,
            "queue_size": state.worker.max_waiting,
        }
    )


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return PlainTextResponse(state.metrics.render(state.worker), media_type="text/plain; version=0.0.4; charset=utf-8")


async def root(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse(
        {
            "name": "localglm",
            "model": state.settings.model_name,
            "endpoints": ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
                          "/v1/messages/count_tokens", "/v1/responses", "/v1/responses/input_tokens", "/api/chat", "/api/generate", "/api/tags",
                          "/api/show", "/api/ps", "/api/version", "/health", "/metrics"],
        }
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(error_body(exc, request.url.path), status_code=exc.status, headers=exc.headers or None)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        path = request.url.path
        known = {getattr(r, "path", None) for r in request.app.routes}
        hint = f" (without the trailing slash: {path.rstrip('/')})" if path.endswith("/") and path.rstrip("/") in known else ""
        message = f"no route {request.method} {path}{hint}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    err = APIError(exc.status_code, message)
    return JSONResponse(error_body(err, request.url.path), status_code=exc.status_code, headers=exc.headers)


def create_app(
    model: Model,
    settings: ServerSettings | None = None,
    *,
    logits_processor_hook: LogitsProcessorHook | None = None,
) -> Starlette:
    """The server app for one loaded model.

    `logits_processor_hook(endpoint, request_json)` may return a logits processor for a request;
    it exists for tests (forcing the model's exact output end to end) and cannot be set over HTTP.
    """
    settings = settings or ServerSettings(model_name=model.path.name)
    model.prompt_cache = settings.prompt_cache(model.setup)
    metrics_ = Metrics(settings.model_name, model.ctx, model.prompt_cache)
    worker = EngineWorker(model, max_waiting=settings.queue_size, on_finish=metrics_.on_finish)
    state = ServerState(model=model, settings=settings, worker=worker, metrics=metrics_, hook=logits_processor_hook)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            state.begin_shutdown()
            worker.stop()
            model.keep_prompts()  # with --cache-dir: the conversations' caches for the next start

    routes = [
        Route("/", root, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", openai_routes.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", openai_routes.get_model, methods=["GET"]),
        Route("/v1/chat/completions", openai_routes.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_routes.completions, methods=["POST"]),
        Route("/v1/messages", anthropic_routes.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", anthropic_routes.count_tokens, methods=["POST"]),
        Route("/v1/responses", responses_routes.create, methods=["POST"]),
        Route("/v1/responses/input_tokens", responses_routes.input_tokens, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses_routes.retrieve, methods=["GET"]),
        Route("/v1/responses/{response_id}", responses_routes.delete, methods=["DELETE"]),
        Route("/api/chat", ollama_routes.chat, methods=["POST"]),
        Route("/api/generate", ollama_routes.generate, methods=["POST"]),
        Route("/api/tags", ollama_routes.tags, methods=["GET"]),
        Route("/api/show", ollama_routes.show, methods=["POST"]),
        Route("/api/ps", ollama_routes.ps, methods=["GET"]),
        Route("/api/version", ollama_routes.version, methods=["GET"]),
    ]
    handlers: dict[Any, Any] = {APIError: _api_error, HTTPException: _http_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.router.redirect_slashes = False  # a 307 with an empty body is no answer for an API client: a JSON 404 says why
    app.state.server = state
    app.add_middleware(GuardMiddleware, state=state)
    return app
