"""How many output pixels one request may ask of a provider: n x width x height, within a budget.

Every size is valid on its own (the model's maximum is 2048x2048), but `n` multiplies it: n=10 at
2048x2048 is 42 megapixels, about 10 GB and minutes of work for the local engine on a CPU. So each
provider has a budget of output pixels per request, and a provider whose budget a request exceeds
does not take it (the router says why, or tries another provider that can):

- hosted providers: `max_request_pixels` (default 10 x 2048 x 2048: what the catalog allows; the
  gateway only downloads, checks and stores the results);
- the local engine: `local_max_request_pixels`, by default 4 megapixels on a CPU (4 images at
  1024x1024, or one at 2048x2048) and 16 on a GPU.

The budgets are in each model's compiled schema (`limits.max_request_pixels`, per provider).
"""

from __future__ import annotations

import functools
from pathlib import Path

from .catalog import ProviderEntry
from .config import Settings
from .params import DEFAULT_AREA
from .providers.base import ImageJob, Refusal

MEGAPIXEL = 1024 * 1024
LOCAL_CPU_DEFAULT = 4 * MEGAPIXEL
LOCAL_GPU_DEFAULT = 16 * MEGAPIXEL


def budget(settings: Settings, entry: ProviderEntry) -> int:
    """Output pixels (n x width x height) one request may ask of this provider entry."""
    if entry.provider != "local":
        return settings.max_request_pixels
    if settings.local_max_request_pixels is not None:
        return settings.local_max_request_pixels
    return LOCAL_GPU_DEFAULT if _engine_on_gpu(settings) else LOCAL_CPU_DEFAULT


def requested_pixels(job: ImageJob) -> int:
    """n x the output area: the size asked for, else an edit's input (within the model's maximum),
    else the one-megapixel default."""
    if job.size.size is not None:
        area = job.size.size.area
    elif job.images:
        width, height = job.images[0].size
        area = min(width * height, job.model.max_pixels)
    else:
        area = DEFAULT_AREA
    return job.n * area


def over_budget(settings: Settings, entry: ProviderEntry, job: ImageJob) -> Refusal | None:
    """Why this entry will not take the job (a reason for the router), or None."""
    limit, asked = budget(settings, entry), requested_pixels(job)
    if asked <= limit:
        return None
    setting = "KONTEXT_LOCAL_MAX_REQUEST_PIXELS" if entry.provider == "local" else "KONTEXT_MAX_REQUEST_PIXELS"
    return Refusal(
        f"n={job.n} images of {asked // job.n} pixels is {asked} pixels, over its budget of {limit} pixels "
        f"per request (fewer or smaller images; the operator sets {setting})",
        param="n",
    )


def _engine_on_gpu(settings: Settings) -> bool:
    """Where the local engine will run, decided without torch (schemas are built at start, and torch
    may be half imported on the engine's thread at any moment): the configured device, else CUDA
    when an NVIDIA driver is loaded, as torch would find it."""
    if settings.device:
        return settings.device.startswith("cuda")
    return _nvidia_driver()


@functools.cache
def _nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists()
