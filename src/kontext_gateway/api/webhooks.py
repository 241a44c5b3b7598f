"""GET /v1/webhooks/default/secret: the key receivers verify webhook signatures with (as Replicate)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..gateway import Gateway

router = APIRouter()


@router.get("/v1/webhooks/default/secret")
async def default_secret(request: Request) -> JSONResponse:
    gw: Gateway = request.app.state.gateway
    # A credential: never cached by anything between the gateway and the caller.
    return JSONResponse({"key": gw.webhooks.secret.key}, headers={"cache-control": "no-store"})
