"""Replicate's predictions API: create (optionally waiting), get, list, cancel.

Routes only: parsing the body (`protocol.prediction_call`) and the `Prefer` header, and rendering; the
PredictionService does the rest.
"""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import invalid
from ..idempotency import HEADER as IDEMPOTENCY_HEADER
from ..idempotency import fingerprint
from ..protocol import prediction_call
from ..service import new_request_id
from . import openapi
from .auth import principal
from .bodies import json_body
from .deps import gateway
from .images import dry_run
from .stopping import answering_stop

router = APIRouter()
_WAIT = re.compile(r"^\s*wait(?:\s*=\s*(\d+))?\s*$", re.IGNORECASE)
MAX_WAIT_S = 60


@router.post(
    "/v1/predictions", status_code=201, responses=openapi.PREDICTION_CREATED, openapi_extra=openapi.PREDICTION_BODY
)
async def create(request: Request) -> JSONResponse:
    return await _create(request, model=None)


@router.post(
    "/v1/models/{owner}/{name}/predictions",
    status_code=201,
    responses=openapi.PREDICTION_CREATED,
    openapi_extra=openapi.PREDICTION_BODY,
)
async def create_for_model(request: Request, owner: str, name: str) -> JSONResponse:
    return await _create(request, model=f"{owner}/{name}")


@router.get("/v1/predictions", responses=openapi.PREDICTION_LIST)
async def list_predictions(request: Request, cursor: str | None = None, limit: int = 100) -> JSONResponse:
    """Newest first, 100 a page (`limit` makes pages smaller); `next` is the next page's URL."""
    gw = gateway(request)
    if not 1 <= limit <= 100:
        raise invalid("'limit' must be between 1 and 100.", param="limit", code="integer_out_of_range")
    return JSONResponse(await gw.predictions.list(str(request.base_url), cursor, limit, principal=principal(request)))


@router.get("/v1/predictions/{rid}", responses=openapi.PREDICTION)
async def get(request: Request, rid: str) -> JSONResponse:
    gw = gateway(request)
    return JSONResponse(await gw.predictions.get(rid, str(request.base_url), principal=principal(request)))


@router.post("/v1/predictions/{rid}/cancel", responses=openapi.PREDICTION_CANCELED)
async def cancel(request: Request, rid: str) -> JSONResponse:
    gw = gateway(request)
    return JSONResponse(await gw.predictions.cancel(rid, str(request.base_url), principal=principal(request)))


async def _create(request: Request, model: str | None) -> JSONResponse:
    gw = gateway(request)
    body = await json_body(request, max_bytes=gw.settings.max_body_bytes)
    request.state.model = str(model or body.get("model") or body.get("version") or "")[:64]  # metrics label
    base_url, wait = str(request.base_url), _prefer_wait(request.headers.get("prefer"))
    who = principal(request)
    provider = request.headers.get("x-provider")
    parsed = prediction_call(model, body)
    if dry_run(request):
        return JSONResponse(await gw.predictions.estimate(parsed, base_url=base_url, principal=who, provider=provider))
    request_id = new_request_id()
    if key := request.headers.get(IDEMPOTENCY_HEADER):
        fp = fingerprint(request.url.path, body)
        existing = await gw.idempotency.claim(who.scope, key, fp, request_id)
        if existing is not None:  # a retry: the same prediction, nothing created or charged again
            try:
                prediction = await gw.predictions.get(existing, base_url, wait=wait, principal=who)
            except asyncio.CancelledError:
                if not answering_stop(gw.worker.draining):
                    raise
                prediction = await gw.predictions.get(existing, base_url, principal=who)
            return JSONResponse(prediction, status_code=201, headers={"idempotent-replayed": "true"})
    try:
        prediction = await gw.predictions.create(
            parsed, base_url=base_url, wait=wait, request_id=request_id, principal=who, provider=provider
        )
    except asyncio.CancelledError:
        # Cut off by the server's stop while `Prefer: wait` held it: the prediction as it stands, as
        # when the wait runs out (it goes on in the queue, handed back).
        if not (wait and answering_stop(gw.worker.draining)):
            raise
        prediction = await gw.predictions.get(request_id, base_url, principal=who)
    return JSONResponse(prediction, status_code=201)


def _prefer_wait(prefer: str | None) -> float | None:
    """`Prefer: wait` holds the request up to 60 s; `wait=N` up to N (1..60). RFC 7240 preferences
    the server does not know are ignored."""
    if not prefer:
        return None
    for part in prefer.split(","):
        m = _WAIT.match(part)
        if m:
            seconds = int(m.group(1)) if m.group(1) else MAX_WAIT_S
            if not 1 <= seconds <= MAX_WAIT_S:
                raise invalid(
                    f"Prefer: wait={seconds} is out of range (1 to {MAX_WAIT_S} seconds).",
                    param="Prefer",
                    code="invalid_value",
                )
            return float(seconds)
    return None
