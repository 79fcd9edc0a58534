"""`localglm serve`: OpenAI-, Anthropic- and Ollama-compatible HTTP server for coding agents and editors.

    from localglm.server import create_app, ServerSettings
    app = create_app(localglm.load(path), ServerSettings(model_name="glm"))  # any ASGI server runs it

Layout: `app` (routes, Host and API-key checks, error shapes), `openai_routes`, `anthropic_routes`,
`responses_routes` (OpenAI's Responses API; `responses_request` reads its items, `response_store` keeps
responses for `previous_response_id`), `ollama_routes` (Ollama's /api/), `chat` (the request both APIs normalize to, queueing, reply filtering), `body` (reading the JSON
body: content type, size cap, deadline), `worker` (the bounded FIFO queue and the one thread that
owns the model), `sse` (streaming and disconnects), `http` (uvicorn with header deadlines, an idle
connection cap and a shutdown that ends streams cleanly; any ASGI server runs the app, but only
this adds those), `metrics`, `validation`, `errors`, `command` (the CLI subcommand).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .state import ServerSettings

__all__ = ["create_app", "ServerSettings"]
_LAZY = {"create_app": ".app", "ServerSettings": ".state"}  # imported on use: `localglm --help` registers `serve` without torch


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
