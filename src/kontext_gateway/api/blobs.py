"""GET /v1/blobs/{id}: stored outputs, behind HMAC-signed, expiring URLs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from ..errors import GatewayError, not_found
from ..links import BLOB_ROUTE
from ..store.blobs import CACHE_CONTROL
from . import openapi
from .deps import gateway

router = APIRouter()


@router.get(BLOB_ROUTE + "{blob_id}", responses=openapi.BLOB)
async def get_blob(request: Request, blob_id: str, exp: str = "", sig: str = "") -> Response:
    gw = gateway(request)
    if not gw.links.verify_blob(blob_id, exp, sig):
        raise GatewayError(
            "This image link is invalid or has expired; request the image again.", status=403, code="invalid_signature"
        )
    blob = await gw.blobs.open(blob_id)
    if blob is None:
        raise not_found(f"No stored image '{blob_id}'.", code="blob_not_found")
    headers = {"cache-control": CACHE_CONTROL}
    if blob.path is not None:  # a local file: sent as one (sendfile, ranges, validators)
        return FileResponse(blob.path, media_type=blob.media_type, headers=headers)
    # From object storage, streamed as it arrives. The id is the bytes' hash: a strong validator.
    headers |= {"content-length": str(blob.size), "etag": f'"{blob_id.split(".")[0]}"'}
    return StreamingResponse(blob.chunks, media_type=blob.media_type, headers=headers)
