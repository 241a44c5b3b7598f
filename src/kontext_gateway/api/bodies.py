"""Reading request bodies: a size limit per route, the content type the route takes, JSON within limits.

A browser on another site can send `text/plain`, `application/x-www-form-urlencoded` and
`multipart/form-data` bodies without asking first (no CORS preflight). JSON routes therefore take
only a JSON content type (415 otherwise): a page can then only send them JSON after a preflight, which
this gateway answers only for the origins it is told to trust. (Multipart routes rely on the origin
check in `trusted.py`.)

Bodies are read into one growing buffer that stops at the route's limit, so a route that takes
small bodies (text-to-image, admin) refuses a large one before holding it, and no route ever holds
a body twice.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from .. import safejson
from ..errors import GatewayError, invalid, too_large

KIB = 1024
MIB = 1024 * KIB
# Bodies of routes that carry no images: a 32,000-character prompt, escaped, is under 200 KiB.
SMALL_JSON_BYTES = 1 * MIB
ADMIN_JSON_BYTES = 64 * KIB


def media_type(request: Request) -> str:
    """The content type without parameters, lower case ('' when none was sent)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def is_json(request: Request) -> bool:
    kind = media_type(request)
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def unsupported_media_type(expected: str) -> GatewayError:
    return GatewayError(
        f"Unsupported Content-Type: send {expected}.", status=415, param="Content-Type", code="unsupported_media_type"
    )


async def read_body(request: Request, max_bytes: int) -> bytearray:
    """The whole body, or 413 as soon as it is known to be over `max_bytes`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(len(body), max_bytes)
    return body


async def json_body(request: Request, *, max_bytes: int, empty: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body as a JSON object (415 unless sent as JSON; 400 saying what is wrong). `empty`: what
    an empty body means (None: an error)."""
    raw = await read_body(request, max_bytes)
    if not raw:
        if empty is None:
            raise invalid("The request body is empty: send a JSON object.", code="invalid_json")
        return dict(empty)
    if not is_json(request):
        raise unsupported_media_type("application/json")
    text = safejson.decode(raw)
    raw.clear()  # freed now: the text and what is parsed from it are all that is held
    body = safejson.loads(text)
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    return body


def _too_large(size: int, limit: int) -> GatewayError:
    return too_large(
        f"The request body ({size} bytes or more) is over this route's limit of {limit} bytes.",
        code="request_too_large",
    )
