"""Request history and usage: GET /v1/requests, GET /v1/requests/{id}, DELETE /v1/requests/{id}/payloads,
GET /v1/usage. Routes only; the queries are in kontext_gateway.history."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..history import History
from . import openapi
from .auth import principal
from .deps import gateway

router = APIRouter()


def _history(request: Request) -> History:
    return gateway(request).history


@router.get("/v1/requests", responses=openapi.REQUEST_LIST)
async def list_requests(
    request: Request,
    key_id: str | None = None,
    model: str | None = None,
    provider: str | None = None,
    status: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
    limit: int = 20,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Newest first; `next_cursor` continues the listing (pass it back as `cursor`, same filters)."""
    return await _history(request).page(
        principal(request),
        str(request.base_url),
        key_id=key_id,
        model=model,
        provider=provider,
        status=status,
        created_after=created_after,
        created_before=created_before,
        limit=limit,
        cursor=cursor,
    )


@router.get("/v1/requests/{rid}", responses=openapi.REQUEST)
async def get_request(request: Request, rid: str) -> dict[str, Any]:
    return await _history(request).get(rid, principal(request), str(request.base_url))


@router.delete("/v1/requests/{rid}/payloads", responses=openapi.REQUEST_PURGED)
async def purge_payloads(request: Request, rid: str) -> dict[str, Any]:
    """Delete the request's prompt, input and images; its cost, status and timings stay."""
    return await _history(request).purge(rid, principal(request), str(request.base_url))


@router.get("/v1/usage", responses=openapi.USAGE)
async def usage(
    request: Request,
    key_id: str | None = None,
    model: str | None = None,
    provider: str | None = None,
    start: str | None = None,
    end: str | None = None,
    group_by: str | None = None,
) -> dict[str, Any]:
    return await _history(request).usage(
        principal(request), key_id=key_id, model=model, provider=provider, start=start, end=end, group_by=group_by
    )
