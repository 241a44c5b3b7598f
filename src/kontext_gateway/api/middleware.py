"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs latency on every request)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import metrics
from ..errors import GatewayError, too_large


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413 in the OpenAI envelope, whether declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await send_error(send, self._error(declared))
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error(seen)  # rendered by the app's GatewayError handler
            return message

        await self.app(scope, limited_receive, send)

    def _error(self, size: int) -> GatewayError:
        return too_large(
            f"The request body ({size} bytes or more) is over the limit of {self.max_bytes} bytes.",
            code="request_too_large",
        )


class MetricsMiddleware:
    """Counts and times every HTTP request (`kontext_requests_total`, `kontext_request_duration_seconds`)
    by route template, model and status, and gives every /v1 response an `x-request-id`.

    The route is the template the router matched (`/v1/predictions/{rid}`, never the id itself;
    "other" when nothing matched), the model what the handler put in `request.state.model`, mapped
    to its catalog id ("unknown" when the catalog does not know it): labels stay few and hold no
    user data."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500  # what the server answers when the app raises before starting a response
        needs_id = scope["path"].startswith("/v1/")

        counted = False

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                route = getattr(scope.get("route"), "path", None) or "other"
                metrics.request(route, _model_label(scope), status, time.perf_counter() - t0)

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers") or []
                if needs_id and not any(name.lower() == b"x-request-id" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"x-request-id", f"req_{uuid.uuid4().hex}".encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte leaves: a client that has its answer sees it counted.
                count()
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            count()  # no complete response (an error, a disconnect): counted as it ended


def _model_label(scope: Scope) -> str:
    raw: Any = (scope.get("state") or {}).get("model")
    if not raw or not isinstance(raw, str):
        return ""
    gateway = getattr(getattr(scope.get("app"), "state", None), "gateway", None)
    if gateway is None:
        return "unknown"
    try:  # a Replicate version ("owner/name:hash") names its model before the colon
        return str(gateway.catalog.resolve(raw.split(":", 1)[0])[0].id)
    except Exception:
        return "unknown"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def send_error(send: Send, exc: GatewayError) -> None:
    """Answer an error before the app has read the request: the envelope, then the connection closes
    (what is left of the body is never read)."""
    body = json.dumps(exc.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-should-retry", b"false"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
