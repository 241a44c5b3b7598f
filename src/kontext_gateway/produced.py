"""The size an image will be produced at, known before anything runs: what a dry run reports.

A real request reports the size actually made (the response's `size`); each provider decides it in
its own way, so a dry run predicts it per provider:

- the local engine honours a size to the nearest multiple of 16 on each side (engine/resolution.py
  `output_size`: 1183x887 gives 1184x880); an edit with no size asked gets the preferred Kontext
  resolution nearest the input's ratio, text-to-image 1024x1024;
- a hosted route takes an aspect ratio, not pixels: the nearest of the ratios it takes (its catalog
  entry's `aspect_ratios`, else the model's), and makes about one megapixel at that ratio, the size
  the product pages' 1K table gives (4:3: 1183x887), whatever the tier or WxH asked. With no shape
  asked: 1:1 for text-to-image, the input's ratio for an edit.
"""

from __future__ import annotations

from .catalog import ProviderEntry
from .engine.resolution import output_size
from .params import TIER_AREAS, Size, nearest_ratio, parse_ratio, size_for
from .providers.base import ImageJob


def produced_size(entry: ProviderEntry, job: ImageJob) -> Size:
    """The size `entry` will make for `job`."""
    input_size = Size(*job.images[0].size) if job.images else None
    if entry.provider == "local":
        return output_size(job.size.size, input_size, job.model.max_pixels)
    asked = job.size.size  # an edit asking only a tier has the input's shape here
    ratio = asked.ratio if asked is not None else input_size.ratio if input_size is not None else 1.0
    sent = nearest_ratio(ratio, entry.aspect_ratios or job.model.aspect_ratios)
    return size_for(parse_ratio(sent) or 1.0, TIER_AREAS["1K"])
