"""HTTP errors in the two JSON shapes the official clients parse.

OpenAI routes answer `{"error": {"message", "type", "param", "code"}}`; Anthropic routes answer
`{"type": "error", "error": {"type", "message"}}`; Ollama's routes (/api/) `{"error": message}`. One `APIError` carries what both need, and the
route family (decided by the path) picks the shape, so a handler never has to know which client
it is talking to.
"""

from __future__ import annotations

from typing import Any

# HTTP status -> (OpenAI error type, Anthropic error type)
_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    403: ("permission_error", "permission_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    408: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_request_error"),
    422: ("server_error", "api_error"),  # the model produced NaN: the server's fault, but not worth a retry
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
}
CLOSE = {"connection": "close"}  # for answers given before the request body was read to its end


class APIError(Exception):
    """An error answered to the client; `param` names the offending request field, if any."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, ("invalid_request_error" if self.status < 500 else "server_error", ""))[0]
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, ("", "invalid_request_error" if self.status < 500 else "api_error"))[1]
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(err: APIError, path: str) -> dict[str, Any]:
    """The error in the shape the route family's clients parse: Anthropic's, Ollama's (`{"error": message}`
    on /api/), else OpenAI's."""
    if path.startswith("/api/"):
        return {"error": err.message}
    return err.anthropic_body() if is_anthropic_path(path) else err.openai_body()
