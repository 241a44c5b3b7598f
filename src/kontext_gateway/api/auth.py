"""Authentication: a pure ASGI middleware in front of every /v1 route but the signed blob links.

A middleware rather than a FastAPI dependency on each router: FastAPI's dependency solving costs
about 35 µs a request, a third of a whole GET /v1/models (benchmarks/RESULTS.md, section 8). The
Principal goes on `request.state.principal` for the handlers (scoping, limits, budgets).
"""

from __future__ import annotations

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import logs
from ..errors import GatewayError
from ..keys import OPEN, Principal, forbidden
from .errors import error_response

# Their signature is their credential: an <img src> cannot send a header.
UNGUARDED = ("/v1/blobs/",)


class AuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/") or path.startswith(UNGUARDED):
            return await self.app(scope, receive, send)
        gateway = scope["app"].state.gateway
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            principal = await gateway.auth.authenticate(authorization)
        except GatewayError as exc:
            return await error_response(exc, Request(scope))(scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        logs.set_context(key_id=principal.key_id)  # the key's id, never the key, on this request's log lines
        await self.app(scope, receive, send)


def principal(request: Request) -> Principal:
    return getattr(request.state, "principal", OPEN)


async def require_admin(request: Request) -> Principal:
    """A dependency of the admin router: the authenticated caller must hold an admin key."""
    who = principal(request)
    if not who.admin:
        raise forbidden(
            "This needs an admin key (`kontext keys create --admin`, or KONTEXT_ADMIN_KEY).", code="admin_required"
        )
    return who
