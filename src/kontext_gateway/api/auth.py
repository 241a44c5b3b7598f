"""Authentication as a FastAPI dependency: every /v1 router but the signed blob links depends on it.

The Principal is kept on `request.state.principal` for the handlers (scoping, limits, budgets).
"""

from __future__ import annotations

from fastapi import Request

from .. import logs
from ..gateway import Gateway
from ..keys import Principal, forbidden


async def authenticate(request: Request) -> Principal:
    gw: Gateway = request.app.state.gateway
    principal = await gw.auth.authenticate(request.headers.get("authorization"))
    request.state.principal = principal
    logs.set_context(key_id=principal.key_id)  # the key's id, never the key, on this request's log lines
    return principal


def principal(request: Request) -> Principal:
    return request.state.principal


async def require_admin(request: Request) -> Principal:
    who = await authenticate(request)
    if not who.admin:
        raise forbidden("This needs an admin key (`kontext keys create --admin`, or KONTEXT_ADMIN_KEY).",
                        code="admin_required")
    return who
