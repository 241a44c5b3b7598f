"""Input images as hosted upstreams get them: no larger than Kontext works at, compactly encoded.

FLUX.1 Kontext works near one megapixel: its preferred resolutions are about 1024x1024 in area, and
the hosted routes size their output from the input's aspect ratio, not from its pixel count. A
12-megapixel phone photo sent whole only costs upload time (and goes over what some routes take
inline). So each input is, before it leaves:

- scaled down, keeping its aspect ratio, to at most `WORKING_PIXELS` (never up);
- encoded as JPEG at quality 95 (a photo's natural format; visually lossless), or as PNG when that is
  smaller (flat graphics, small images);
- sent inline (base64 or a data URI, as the route takes it) when that fits the route's inline limit,
  else through the provider's own upload (Replicate's files API, fal's storage) and sent by URL.

Everything here is pure: the same image gives the same bytes.
"""

from __future__ import annotations

import base64
import io

from PIL import Image

from .calls import Encoded

WORKING_PIXELS = 1024 * 1024  # Kontext's working area: its preferred resolutions are all about this size
JPEG_QUALITY = 95
PNG_TRY_PIXELS = 512 * 512  # at or under this, PNG may be the smaller (graphics): both are tried


def compact(image: Image.Image, *, max_pixels: int = WORKING_PIXELS) -> Encoded:
    """`image` (RGB) at most `max_pixels`, encoded as the smaller of JPEG and, for small images, PNG."""
    image = scaled(image, max_pixels)
    candidates = [Encoded(_encode(image, "JPEG", quality=JPEG_QUALITY, optimize=True), "jpeg")]
    if image.width * image.height <= PNG_TRY_PIXELS:
        candidates.append(Encoded(_encode(image, "PNG", optimize=False, compress_level=6), "png"))
    return min(candidates, key=lambda e: len(e.data))


def scaled(image: Image.Image, max_pixels: int) -> Image.Image:
    """The image within `max_pixels`, aspect ratio kept (to the nearest pixel); unchanged if it fits."""
    area = image.width * image.height
    if area <= max_pixels:
        return image
    factor = (max_pixels / area) ** 0.5
    size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
    return image.resize(size, Image.Resampling.LANCZOS)


def data_uri(encoded: Encoded) -> str:
    return f"data:{encoded.mime};base64,{base64.b64encode(encoded.data).decode()}"


def bare_base64(encoded: Encoded) -> str:
    return base64.b64encode(encoded.data).decode()


def inline_size(encoded: Encoded) -> int:
    """Bytes the image takes in a JSON body as base64 (a data URI adds its short header)."""
    return 4 * ((len(encoded.data) + 2) // 3)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, fmt, **options)
    return buf.getvalue()
