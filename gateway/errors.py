"""The gateway's one error type: each face maps ``status`` to its own shape (HTTP status and
OpenAI error body, or a gRPC status code)."""

from __future__ import annotations

from collections.abc import Mapping


class GatewayError(Exception):
    """A request the gateway refuses or could not serve; each face maps ``status`` to its own
    error shape (HTTP status + OpenAI error body, or a gRPC status code)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})   # e.g. retry-after, x-ratelimit-* on a 429
        self._type = type_

    @property
    def type(self) -> str:
        return self._type or _ERROR_TYPES.get(self.status, "server_error")


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                404: "not_found_error", 413: "invalid_request_error", 429: "requests",
                503: "service_unavailable"}


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param, code)
