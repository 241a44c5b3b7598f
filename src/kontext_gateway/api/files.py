"""Replicate's files API: upload an input image once, then pass its URL as a prediction input.

`POST /v1/files` (multipart `content`, optional `metadata` JSON) and `GET /v1/files/{id}`, in
Replicate's shape, which the official `replicate` client uses for local files. A file URL of this
gateway given as an input is read from the store directly, never fetched over HTTP.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from .. import safejson
from ..errors import invalid, not_found, too_large
from ..imaging import EXTENSIONS, MIME_TYPES, sniff_format
from ..store.models import utcnow
from ..store.records import FileRow
from ..timing import iso
from . import openapi
from .auth import principal
from .bodies import media_type, unsupported_media_type
from .deps import gateway

router = APIRouter()
FILES_ROUTE = "/v1/files/"
FILE_TTL = timedelta(days=1)  # as Replicate keeps uploads


def file_object(record: FileRow, base_url: str) -> dict[str, Any]:
    base = base_url.rstrip("/")
    return {
        "id": record.id,
        "name": record.name,
        "content_type": record.content_type,
        "size": record.size,
        "etag": record.sha256,
        "checksums": {"sha256": record.sha256},
        "metadata": record.metadata_ or {},
        "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at),
        "urls": {"get": f"{base}{FILES_ROUTE}{record.id}"},
    }


@router.post("/v1/files", status_code=201, responses=openapi.FILE_CREATED, openapi_extra=openapi.FILE_BODY)
async def create_file(request: Request) -> JSONResponse:
    gw = gateway(request)
    if media_type(request) != "multipart/form-data":
        raise unsupported_media_type("multipart/form-data with the file as 'content'")
    async with request.form(max_files=1, max_fields=16) as form:  # its spooled file closed on every way out
        upload = form.get("content")
        if not isinstance(upload, UploadFile):
            raise invalid(
                "Upload the file as the multipart field 'content'.", param="content", code="missing_required_parameter"
            )
        if upload.size is not None and upload.size > gw.settings.max_file_bytes:
            raise too_large(
                f"The file is over {gw.settings.max_file_bytes} bytes.", param="content", code="file_too_large"
            )
        if upload.filename is not None and "\x00" in upload.filename:  # PostgreSQL cannot store it
            raise invalid(
                "The file name holds a NUL character, which is not accepted.", param="content", code="invalid_value"
            )
        data = await upload.read()
        fmt = sniff_format(data)
        if fmt not in ("png", "jpeg", "gif", "webp"):
            raise invalid(
                "Only images are accepted: PNG, JPEG, WebP or GIF.", param="content", code="unsupported_image_format"
            )
        raw_metadata = form.get("metadata")
        metadata = (
            safejson.loads(raw_metadata, what="'metadata'", param="metadata")
            if isinstance(raw_metadata, str) and raw_metadata
            else {}
        )
        if not isinstance(metadata, dict):
            raise invalid("'metadata' must be a JSON object.", param="metadata", code="invalid_json")
    now = utcnow()
    blob_id = await gw.blobs.put(data, ext=EXTENSIONS[fmt])
    record = await gw.db.create_file(
        id=uuid.uuid4().hex[:26],
        blob_id=blob_id,
        name=(upload.filename or f"file.{EXTENSIONS[fmt]}")[:255],
        content_type=MIME_TYPES[fmt],
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        metadata_=metadata,
        created_at=now,
        expires_at=now + FILE_TTL,
        key_id=principal(request).key_id,
    )
    return JSONResponse(file_object(record, str(request.base_url)), status_code=201)


@router.get(FILES_ROUTE + "{file_id}", responses=openapi.FILE)
async def get_file(request: Request, file_id: str) -> JSONResponse:
    gw = gateway(request)
    record = await gw.db.get_file(file_id)
    if record is None or not principal(request).owns(record):
        raise not_found(f"No file '{file_id}'.", code="file_not_found")
    return JSONResponse(file_object(record, str(request.base_url)))


@router.get(FILES_ROUTE + "{file_id}/download", responses=openapi.FILE_DOWNLOAD)
async def download_file(request: Request, file_id: str) -> Response:
    gw = gateway(request)
    record = await gw.db.get_file(file_id)
    data = await gw.blobs.get(record.blob_id) if record is not None and principal(request).owns(record) else None
    if record is None or data is None:
        raise not_found(f"No file '{file_id}'.", code="file_not_found")
    return Response(data, media_type=record.content_type)
