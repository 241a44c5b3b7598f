"""The local provider: FLUX.1 Kontext run in-process with diffusers.

`kontext-tiny` is always available (built in-process); `flux.1-kontext-dev` when a weights directory
in diffusers layout is configured (or downloads are allowed). Inference runs on one worker thread, off
the event loop: the server keeps answering while an image is made, and local requests run one at a
time in arrival order. torch is imported on the first local request, not before.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog import ProviderEntry
from ..config import Settings
from ..errors import GatewayError, unavailable
from ..params import Size
from .base import ImageJob, ProviderImage, ProviderResult

if TYPE_CHECKING:
    from ..engine.pipeline import KontextEngine

log = logging.getLogger(__name__)

TINY_ID = "kontext-tiny"
# Parameters the engine reads; everything else in a request is reported as ignored.
_HANDLING = {
    "prompt": {"handling": "native", "as": "prompt"},
    "seed": {"handling": "converted", "as": "generator (CPU torch.Generator)"},
    "size": {"handling": "converted", "as": "width/height (nearest multiples of 16)"},
    "aspect_ratio": {"handling": "converted", "as": "width/height (nearest multiples of 16)"},
    "resolution": {"handling": "converted", "as": "width/height (nearest multiples of 16)"},
    "image": {"handling": "renamed", "as": "image"},
    "n": {"handling": "renamed", "as": "num_images_per_prompt (one batched call)"},
    "cfg_scale": {"handling": "renamed", "as": "guidance_scale"},
    "num_inference_steps": {"handling": "native", "as": "num_inference_steps"},
    "response_format": {"handling": "emulated", "as": "gateway"},
    "output_format": {"handling": "emulated", "as": "gateway"},
    "output_compression": {"handling": "emulated", "as": "gateway"},
}


def engine_installed() -> bool:
    """Whether the engine extra is installed, without importing torch."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "transformers"))


class LocalProvider:
    name = "local"
    records_attempts = False  # one run per request: the router records it

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engines: dict[str, "KontextEngine"] = {}
        # One worker: jobs run in the order they arrive, and one model is in memory at a time per id.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kontext-engine")
        self._lock = threading.Lock()

    def handling(self, entry: ProviderEntry) -> dict[str, dict[str, str]]:
        return dict(_HANDLING)

    def _weights_dir(self, entry: ProviderEntry) -> Path | None:
        if entry.config_key == "local/flux.1-kontext-dev":
            return self.settings.dev_weights_dir
        return None

    def available(self, entry: ProviderEntry) -> bool:
        if not engine_installed():
            return False
        if entry.provider_model_id == TINY_ID:
            return True
        weights = self._weights_dir(entry)
        return bool(weights and (weights / "model_index.json").is_file()) or self.settings.allow_downloads

    def unavailable_reason(self, entry: ProviderEntry) -> str:
        if not engine_installed():
            return "the local engine is not installed (pip install 'kontext-gateway[engine]')"
        weights = self._weights_dir(entry)
        if weights is None:
            return "no weights directory configured (set KONTEXT_DEV_WEIGHTS_DIR to a diffusers-layout folder)"
        return f"no diffusers-layout weights at {weights} (model_index.json not found)"

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> str | None:
        if len(job.images) > entry.max_input_images:
            return f"takes at most {entry.max_input_images} input image(s)"
        return None

    def engine(self, entry: ProviderEntry) -> "KontextEngine":
        """The loaded engine for this entry, loading it on first use (on the worker thread)."""
        with self._lock:
            engine = self._engines.get(entry.config_key)
            if engine is not None:
                return engine
            from ..engine.pipeline import KontextEngine, set_threads

            set_threads(self.settings.engine_threads)
            device = self.settings.device
            if entry.provider_model_id == TINY_ID:
                engine = KontextEngine.tiny(device)
            elif (weights := self._weights_dir(entry)) and (weights / "model_index.json").is_file():
                engine = KontextEngine.from_dir(weights, name=entry.config_key, device=device)
            elif self.settings.allow_downloads:
                engine = KontextEngine.from_hub(entry.provider_model_id, name=entry.config_key, device=device)
            else:
                raise unavailable(f"Local model {entry.config_key} is not available: {self.unavailable_reason(entry)}.")
            self._engines[entry.config_key] = engine
            return engine

    async def generate(self, entry: ProviderEntry, job: ImageJob) -> ProviderResult:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._generate_sync, entry, job)
        except asyncio.CancelledError:
            job.cancelled.set()  # a queued job never starts; a running one stops at its next step
            raise

    def _generate_sync(self, entry: ProviderEntry, job: ImageJob) -> ProviderResult:
        from ..engine.pipeline import Interrupted
        from ..engine.resolution import context_size, output_size

        if job.cancelled.is_set():
            raise Interrupted()
        engine = self.engine(entry)
        source = job.images[0] if job.images else None
        input_size = Size(*source.size) if source is not None else None
        out = output_size(job.size.size, input_size, job.model.max_pixels)
        ctx = context_size(input_size, out) if input_size is not None else None
        steps = job.steps or job.model.default_steps or 28
        guidance = job.guidance if job.guidance is not None else (job.model.default_guidance or 2.5)
        try:
            images = engine.run(
                prompt=job.prompt, image=source, output=out, context=ctx, steps=steps,
                guidance=guidance, n=job.n, seed=job.seed, progress=job.progress,
                should_stop=job.cancelled.is_set,
            )
        except GatewayError:
            raise
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: a server-side failure
            log.exception("local engine failed for %s", job.request_id)
            raise GatewayError(
                f"The local engine failed: {exc}", status=500, type="server_error", code="engine_error"
            ) from exc
        return ProviderResult(
            images=[ProviderImage(image=im) for im in images],
            size=Size(*images[0].size),
            seed=job.seed,
            ignored_params=sorted(job.extra),
        )

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
