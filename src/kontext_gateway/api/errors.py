"""Every error leaves the gateway in the OpenAI envelope: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GatewayError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def error_response(exc: GatewayError, request: Request | None = None) -> JSONResponse:
    headers = dict(exc.headers)
    if exc.status < 500 and exc.status not in (408, 409, 429):
        headers.setdefault("x-should-retry", "false")  # the OpenAI SDKs would otherwise retry some of these
    body = exc.body()
    if request is not None and _replicate_route(request.url.path):
        # Replicate's clients read RFC 7807 problem details; the OpenAI envelope stays alongside.
        body.update(title=exc.code or exc.type, detail=exc.message, status=exc.status)
    return JSONResponse(body, status_code=exc.status, headers=headers)


def _replicate_route(path: str) -> bool:
    return path.startswith(("/v1/predictions", "/v1/files")) or (
        path.startswith("/v1/models/") and path.endswith("/predictions")
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = str(exc.detail)
        if status == 404:
            message = f"Unknown route: {request.method} {request.url.path}"
        elif status == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        elif status == 413:
            message = "The request body is too large."
        err = GatewayError(
            message,
            status=status,
            code=_HTTP_CODES.get(status),
            type="invalid_request_error" if status < 500 else "server_error",
        )
        return error_response(err, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        return error_response(
            GatewayError(
                f"Invalid request: {first.get('msg', 'invalid value')}",
                param=".".join(loc) or None,
                code="invalid_value",
            )
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            GatewayError(
                "The server had an error while processing your request.",
                status=500,
                type="server_error",
                code="internal_error",
            )
        )
