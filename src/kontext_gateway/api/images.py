"""POST /v1/images/generations (JSON) and /v1/images/edits (multipart or JSON).

This module only parses HTTP into a typed request (`protocol.ImageCall`) and renders the outcome; the
service does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from .. import safejson
from ..errors import GatewayError, invalid, too_large
from ..idempotency import HEADER as IDEMPOTENCY_HEADER
from ..idempotency import fingerprint
from ..protocol import ImageCall, ImageSource, image_call
from ..service import new_request_id
from . import openapi
from .auth import principal
from .bodies import SMALL_JSON_BYTES, is_json, json_body, media_type, unsupported_media_type
from .deps import gateway
from .stopping import answering_stop
from .streaming import PreviewQueue, stream_response

router = APIRouter()

# `image`, `image[]` (the OpenAI SDKs' array form) and indexed `image[0]`, `image[1]`...
_IMAGE_FIELD = re.compile(r"^image(\[\d*\])?$")


@router.post("/v1/images/generations", responses=openapi.IMAGES_RESPONSES, openapi_extra=openapi.GENERATIONS_BODY)
async def generations(request: Request) -> Response:
    fields = await json_body(request, max_bytes=SMALL_JSON_BYTES)  # no images in text-to-image
    return await _run(request, image_call("text-to-image", fields))


@router.post("/v1/images/edits", responses=openapi.IMAGES_RESPONSES, openapi_extra=openapi.EDITS_BODY)
async def edits(request: Request) -> Response:
    gw = gateway(request)
    if is_json(request):
        return await _run(request, image_call("edit", await json_body(request, max_bytes=gw.settings.max_body_bytes)))
    if media_type(request) != "multipart/form-data":
        raise unsupported_media_type(
            "multipart/form-data (with 'image' files), or application/json with 'images': [{'image_url': ...}]"
        )
    fields: dict[str, Any] = {}
    files: list[ImageSource] = []
    async with request.form(max_files=64, max_fields=256) as form:  # its spooled files closed on every way out
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == "mask":
                    files.append(ImageSource("mask", data=await value.read()))
                    continue
                if not _IMAGE_FIELD.match(name):
                    raise invalid(
                        f"Unexpected file field '{name}': send images as 'image' or 'image[]'.",
                        param=name,
                        code="unexpected_file",
                    )
                if value.size is not None and value.size > gw.settings.max_file_bytes:
                    raise too_large(
                        f"'image' file '{value.filename}' is {value.size} bytes; the limit is "
                        f"{gw.settings.max_file_bytes} bytes (50 MB).",
                        param="image",
                        code="file_too_large",
                    )
                files.append(ImageSource("image", data=await value.read()))
            elif _IMAGE_FIELD.match(name):
                raise invalid("'image' must be an uploaded file.", param="image", code="invalid_type")
            else:
                fields[name] = value
    safejson.check(fields, what="The form", code="invalid_value")  # the same string rules as a JSON body's
    return await _run(request, image_call("edit", fields, files))


async def _run(request: Request, call: ImageCall) -> Response:
    gw = gateway(request)
    request.state.model = str(call.fields.get("model") or gw.settings.default_model)[:64]  # metrics label
    base_url = str(request.base_url)
    who = principal(request)
    provider = request.headers.get("x-provider")
    if dry_run(request):
        return JSONResponse(await gw.images.estimate(call, base_url=base_url, principal=who, provider=provider))
    request_id = new_request_id()
    if str(call.fields.get("stream", "")).lower() in ("true", "1"):
        # Validated and enqueued before the first byte: a bad request is still a plain JSON error.
        previews = PreviewQueue()
        gw.channels.previews[request_id] = previews
        try:
            await gw.images.submit(
                call, base_url=base_url, provider=provider, principal=who, request_id=request_id, waiter=True
            )
        except BaseException:
            gw.channels.previews.pop(request_id, None)
            raise
        return stream_response(gw, request_id, call.mode, previews)
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key:
        fp = fingerprint(request.url.path, dict(call.fields.items()), call.files)
        existing = await gw.idempotency.claim(who.scope, key, fp, request_id)
        if existing is not None:  # a retry: the same job's response; this waiter never cancels it
            try:
                record = await gw.images.wait(existing, cancel_on_abandon=False)
            except asyncio.CancelledError:
                if not answering_stop(gw.worker.draining):
                    raise
                raise _cut_off(existing, retry_safe=True) from None
            outcome = await gw.images.render(record, base_url)
            return JSONResponse(outcome.body, headers={**outcome.headers, "idempotent-replayed": "true"})
    work = asyncio.ensure_future(
        gw.images.create(call, base_url=base_url, provider=provider, request_id=request_id, principal=who)
    )
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        if not answering_stop(gw.worker.draining):
            raise
        # Cut off by the server's stop: the job goes back to the queue; the client hears where.
        work.cancel()
        raise _cut_off(request_id, retry_safe=key is not None) from None
    finally:
        gone.cancel()
    if not work.done():
        # The client hung up: cancel the work, which cancels upstream tasks (nobody pays for them).
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        return JSONResponse(
            {
                "error": {
                    "message": "client closed request",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "client_closed_request",
                }
            },
            status_code=499,
        )
    outcome = work.result()  # re-raises the service's GatewayError for the error handler
    return JSONResponse(outcome.body, headers=outcome.headers)


def dry_run(request: Request) -> bool:
    """`?dryRun=true`: validate and price the request without running it."""
    value = request.query_params.get("dryRun", request.query_params.get("dry_run", "false")).lower()
    if value not in ("true", "1", "false", "0", ""):
        raise invalid("'dryRun' must be true or false.", param="dryRun", code="invalid_value")
    return value in ("true", "1")


def _cut_off(request_id: str, *, retry_safe: bool) -> GatewayError:
    """503 for a request the server stopped waiting on (it shuts down): the job goes on elsewhere.
    A retry would start another job, and pay for it, unless the Idempotency-Key brings it back to
    this one: the SDKs are told to retry only then."""
    retry = "Sending it again with the same Idempotency-Key waits for it." if retry_safe else ""
    return GatewayError(
        f"The server stopped before request '{request_id}' was done. Its job goes on without this "
        f"connection (in another worker, or in this server once restarted): GET /v1/requests/{request_id} "
        f"shows its outcome. {retry}".rstrip(),
        status=503,
        type="server_error",
        code="server_shutting_down",
        headers={
            "x-request-id": request_id,
            "x-should-retry": "true" if retry_safe else "false",
            **({"retry-after": "1"} if retry_safe else {}),
        },
    )


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects. The body is already read, so the next ASGI message the
    server has for this request is `http.disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
