"""One error type for the whole gateway, rendered as the OpenAI error envelope.

Every layer raises `GatewayError` (or a helper below) with the HTTP status, a message a person can act
on, and the OpenAI `type` / `param` / `code`. The HTTP layer renders it as
`{"error": {"message", "type", "param", "code"}}`; nothing else ever reaches a client.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status: int = 400
    type: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        # The provider attempts made before this error, when it comes from running a job.
        self.attempts: list[Any] = []

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.code!r}, {self.message!r})"


def invalid(message: str, *, param: str | None = None, code: str = "invalid_value") -> GatewayError:
    """400: the request is malformed or a value is out of range."""
    return GatewayError(message, status=400, param=param, code=code)


def not_found(message: str, *, param: str | None = None, code: str = "not_found") -> GatewayError:
    return GatewayError(message, status=404, param=param, code=code)


def too_large(message: str, *, param: str | None = None, code: str) -> GatewayError:
    """413: a body or a file is over its size limit."""
    return GatewayError(message, status=413, param=param, code=code)


def unavailable(message: str, *, code: str = "provider_unavailable") -> GatewayError:
    """503: nothing can serve this (no provider configured, no weights...). A retry in a second
    finds the same configuration, so the SDKs are told not to retry."""
    return GatewayError(message, status=503, type="server_error", code=code, headers={"x-should-retry": "false"})


def upstream(message: str, *, code: str = "upstream_error", status: int = 502) -> GatewayError:
    return GatewayError(message, status=status, type="server_error", code=code)


class StartupError(Exception):
    """A configuration the gateway cannot run with (a blob store it cannot write to, say), found at
    start-up: never an API error. Its message is one line naming what is wrong and where; the CLI
    prints it as `error: <message>` and exits 1."""
