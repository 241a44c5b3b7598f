"""GET /v1/blobs/{id}: stored outputs, behind HMAC-signed, expiring URLs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ..errors import GatewayError, not_found
from ..imaging import MIME_TYPES
from ..links import BLOB_ROUTE
from . import openapi
from .deps import gateway

router = APIRouter()
_EXT_FORMAT = {"png": "png", "jpg": "jpeg", "gif": "gif", "webp": "webp", "avif": "avif"}


@router.get(BLOB_ROUTE + "{blob_id}", responses=openapi.BLOB)
async def get_blob(request: Request, blob_id: str, exp: str = "", sig: str = "") -> FileResponse:
    gw = gateway(request)
    if not gw.links.verify_blob(blob_id, exp, sig):
        raise GatewayError(
            "This image link is invalid or has expired; request the image again.", status=403, code="invalid_signature"
        )
    path = gw.blobs.path(blob_id)
    if path is None:
        raise not_found(f"No stored image '{blob_id}'.", code="blob_not_found")
    fmt = _EXT_FORMAT[blob_id.rsplit(".", 1)[1]]
    # Content-addressed: the bytes behind an id never change.
    return FileResponse(path, media_type=MIME_TYPES[fmt], headers={"cache-control": "private, max-age=3600, immutable"})
