"""GET /v1/webhooks/default/secret: the key receivers verify webhook signatures with (as Replicate).

Each caller reads its own: an API key gets the secret that signs its predictions' deliveries (derived
per key, see jobs/webhooks.py), never another key's; the open gateway (no keys) gets the gateway's.
On a keyed gateway a caller without a key gets 401 from the auth middleware before this runs.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from . import openapi
from .auth import principal
from .deps import gateway

router = APIRouter()


@router.get("/v1/webhooks/default/secret", responses=openapi.WEBHOOK_SECRET)
async def default_secret(request: Request) -> JSONResponse:
    gw = gateway(request)
    secret = gw.webhooks.secret_for(principal(request).key_id)
    # A credential: never cached by anything between the gateway and the caller.
    return JSONResponse({"key": secret.key}, headers={"cache-control": "no-store"})
