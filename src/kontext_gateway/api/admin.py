"""The admin API: API keys (create, list, show, update, revoke). Needs an admin key once the
gateway is keyed; the same operations as `kontext keys ...` on the command line."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import invalid
from . import openapi
from .bodies import ADMIN_JSON_BYTES, json_body
from .deps import gateway

router = APIRouter(prefix="/v1/admin")


@router.post("/keys", status_code=201, responses=openapi.KEY_CREATED, openapi_extra=openapi.KEY_CREATE_BODY)
async def create_key(request: Request) -> JSONResponse:
    """The response carries the key itself: the one time it is shown."""
    gw = gateway(request)
    body = await json_body(request, max_bytes=ADMIN_JSON_BYTES, empty={})
    name = body.pop("name", None)
    admin = body.pop("admin", False)
    if not isinstance(name, str):
        raise invalid(
            "'name' is required: a label for the key, e.g. the team or app using it.",
            param="name",
            code="missing_required_parameter",
        )
    if not isinstance(admin, bool):
        raise invalid("'admin' must be true or false.", param="admin", code="invalid_type")
    view, key = await gw.keys.create(name=name, admin=admin, limits=body)
    gw.auth.forget()  # the gateway is keyed from now on, in this process at once
    return JSONResponse({**view, "key": key}, status_code=201)


@router.get("/keys", responses=openapi.KEY_LIST)
async def list_keys(request: Request, include_revoked: bool = True) -> dict[str, Any]:
    gw = gateway(request)
    return {"object": "list", "data": await gw.keys.list(include_revoked=include_revoked)}


@router.get("/keys/{key_id}", responses=openapi.KEY)
async def show_key(request: Request, key_id: str) -> dict[str, Any]:
    gw = gateway(request)
    return await gw.keys.get(key_id)


@router.patch("/keys/{key_id}", responses=openapi.KEY_UPDATED, openapi_extra=openapi.KEY_UPDATE_BODY)
async def update_key(request: Request, key_id: str) -> dict[str, Any]:
    """Change limits; a field set to null removes that limit."""
    gw = gateway(request)
    view = await gw.keys.update(key_id, await json_body(request, max_bytes=ADMIN_JSON_BYTES, empty={}))
    gw.auth.forget(key_id)  # new limits apply at once here (within a second in other processes)
    return view


@router.delete("/keys/{key_id}", responses=openapi.KEY_REVOKED)
async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
    """Revoked at once in this process, within a second in others; its history and spend stay."""
    gw = gateway(request)
    view = await gw.keys.revoke(key_id)
    gw.auth.forget(key_id)
    return view
