"""Output and context-image sizes for the local engine (no torch import: the gateway uses this too).

Kontext was trained on 17 preferred resolutions of about one megapixel. An edit with no size asked
for gets the preferred resolution nearest the input's aspect ratio (as BFL's reference code and
Replicate's `match_input_image` do); an explicit size is honoured to the nearest multiple of 16. The
context image is resized to the preferred resolution for its own aspect ratio, scaled to the output's
area, so the context and the output carry about the same number of tokens.
"""

from __future__ import annotations

import math

from ..params import Size

MULTIPLE = 16  # VAE downsampling (8) x patch size (2)
DEFAULT_T2I = Size(1024, 1024)

# (width, height), identical in diffusers' pipeline_flux_kontext.py and BFL's flux/util.py
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def to_multiple(size: Size, multiple: int = MULTIPLE) -> Size:
    """Nearest multiple of `multiple` on each side, at least one multiple."""

    def snap(v: int) -> int:
        return max(multiple, math.floor(v / multiple + 0.5) * multiple)

    return Size(snap(size.width), snap(size.height))


def preferred_for(ratio: float) -> Size:
    """The preferred Kontext resolution nearest `ratio` (diffusers' rule: min |AR - w/h|)."""
    _, w, h = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return Size(w, h)


def output_size(requested: Size | None, input_size: Size | None, max_pixels: int) -> Size:
    if requested is not None:
        out = to_multiple(requested)
        while out.area > max_pixels:  # rounding up may cross the model's limit: step back
            out = Size(
                out.width - MULTIPLE if out.width >= out.height else out.width,
                out.height - MULTIPLE if out.height > out.width else out.height,
            )
        return out
    if input_size is not None:
        return preferred_for(input_size.ratio)
    return DEFAULT_T2I


def context_size(input_size: Size, output: Size) -> Size:
    pref = preferred_for(input_size.ratio)
    scale = math.sqrt(output.area / pref.area)
    return to_multiple(Size(round(pref.width * scale), round(pref.height * scale)))
