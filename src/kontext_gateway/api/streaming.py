"""`stream: true` on generations and edits: OpenAI's server-sent events.

`image_generation.partial_image` / `image_edit.partial_image` events (`partial_images` of them, 0..3)
while the job runs, then one `.completed` event per image. Previews come from the local engine when
it runs the job in this process (decoded from intermediate latents); upstreams without streaming, or
a job run by another process, give the completed events only. A failure after the stream started is
an `error` event, which the OpenAI SDKs raise as an APIError.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from ..imaging import encode_image
from ..store.records import JobStatus

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..gateway import Gateway

USAGE = {
    "total_tokens": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
}  # images are priced per image here


class PreviewQueue:
    """Previews handed over from the engine's thread to the event loop that streams them."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Image]] = asyncio.Queue()

    def __call__(self, index: int, image: Image) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, image))


def stream_response(gw: Gateway, request_id: str, mode: str, previews: PreviewQueue) -> StreamingResponse:
    kind = "image_edit" if mode == "edit" else "image_generation"

    async def events() -> AsyncIterator[bytes]:
        waiter = asyncio.ensure_future(gw.images.wait(request_id))
        fmt: str | None = None  # the previews' format: read once, with the first preview

        async def partial(index: int, image: Image) -> bytes:
            nonlocal fmt
            if fmt is None:
                record = await gw.db.get_request(request_id)
                wanted = record.params.get("output_format") if record is not None else None
                fmt = wanted if wanted in ("png", "jpeg", "webp") else "png"
            return await _partial(kind, fmt, index, image)

        try:
            while True:
                getter = asyncio.ensure_future(previews.queue.get())
                await asyncio.wait({waiter, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                yield await partial(*getter.result())
            while not previews.queue.empty():  # previews that came just before the end
                yield await partial(*previews.queue.get_nowait())
            record = waiter.result()
            if record.status != JobStatus.SUCCEEDED:
                error = dict(
                    record.error
                    or {
                        "message": "The request was canceled.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "request_canceled",
                    }
                )
                error.pop("status", None)
                error.pop("headers", None)
                yield _sse("error", {"type": "error", "error": error})
                return
            for blob_id in record.output_blob_ids:
                data = await gw.blobs.get(blob_id) or b""
                yield _sse(
                    f"{kind}.completed",
                    {
                        "type": f"{kind}.completed",
                        "b64_json": base64.b64encode(data).decode(),
                        "created_at": int(time.time()),
                        "size": record.output_size,
                        "quality": "auto",
                        "background": "opaque",
                        "output_format": record.output_format,
                        "usage": USAGE,
                        "metadata": {
                            "request_id": request_id,
                            "provider": record.provider,
                            "cost": record.cost,
                        },
                    },
                )
        finally:
            gw.channels.previews.pop(request_id, None)
            if not waiter.done():  # the client went away mid-stream: the job is canceled with it
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await waiter

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"x-request-id": request_id, "cache-control": "no-cache"}
    )


async def _partial(kind: str, fmt: str, index: int, image: Image) -> bytes:
    data = await asyncio.to_thread(encode_image, image, fmt)
    return _sse(
        f"{kind}.partial_image",
        {
            "type": f"{kind}.partial_image",
            "b64_json": base64.b64encode(data).decode(),
            "created_at": int(time.time()),
            "size": f"{image.size[0]}x{image.size[1]}",
            "quality": "auto",
            "background": "opaque",
            "output_format": fmt,
            "partial_image_index": index,
        },
    )


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
