"""The local provider: FLUX.1 Kontext run in-process with diffusers.

`kontext-tiny` is always available (built in-process); `flux.1-kontext-dev` when a weights directory
in diffusers layout is configured (or downloads are allowed). Inference runs on one worker thread, off
the event loop: the server keeps answering while an image is made, and local requests run one at a
time in arrival order. torch is imported on the first local request, not before.

Loaded models are kept in a small LRU (`engine_max_models`): a model is loaded on first use and the
least recently used one is unloaded (its memory freed) when another must come in.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..catalog import ProviderEntry
from ..config import Settings
from ..engine.lean import ACCELERATIONS
from ..errors import GatewayError, invalid, unavailable
from ..params import Size
from ..store.records import Lane
from .base import ImageJob, ProviderImage, ProviderResult, Refusal

if TYPE_CHECKING:
    from ..engine.lora import LoraSpec
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
    "image": {"handling": "converted", "as": "context tokens, one set per image (ComfyUI 'offset' placement)"},
    "n": {"handling": "renamed", "as": "num_images_per_prompt (one batched call)"},
    "cfg_scale": {"handling": "renamed", "as": "guidance_scale"},
    "num_inference_steps": {"handling": "native", "as": "num_inference_steps"},
    "negative_prompt": {"handling": "native", "as": "negative_prompt (used when true_cfg_scale > 1)"},
    "true_cfg_scale": {"handling": "native", "as": "true_cfg_scale"},
    "loras": {"handling": "converted", "as": "load_lora_weights + set_adapters (files under the adapters directory)"},
    "mask": {"handling": "converted", "as": "FluxKontextInpaintPipeline mask_image (strength 1), kept pixels put back"},
    "partial_images": {"handling": "emulated", "as": "previews: the predicted clean image, VAE-decoded"},
    "acceleration": {"handling": "native", "as": "lean transformer: regular = fp8 linears, high = fp8 + step cache"},
    "response_format": {"handling": "emulated", "as": "gateway"},
    "output_format": {"handling": "emulated", "as": "gateway"},
    "output_compression": {"handling": "emulated", "as": "gateway"},
}
# Engine features a request may also carry among its extra parameters: read from there when the job's
# own field is unset, and then not reported as ignored.
_FEATURES_IN_EXTRA = ("negative_prompt", "true_cfg_scale", "loras", "partial_images", "acceleration")


def engine_installed() -> bool:
    """Whether the engine extra is installed, without importing torch."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "transformers"))


class LocalProvider:
    name: ClassVar[str] = "local"
    lane: ClassVar[Lane] = Lane.LOCAL

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Loaded models, least recently used first; at most settings.engine_max_models of them.
        self._engines: OrderedDict[str, KontextEngine] = OrderedDict()
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

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> Refusal | None:
        if len(job.images) > entry.max_input_images:
            return Refusal(f"takes at most {entry.max_input_images} input image(s)", param="image")
        if job.mask is not None and not job.images:
            return Refusal("a mask needs an input image to repaint", param="mask")
        return None

    def engine(self, entry: ProviderEntry) -> KontextEngine:
        """The loaded engine for this entry, loading it on first use (on the worker thread) and
        unloading the least recently used ones past `engine_max_models`."""
        with self._lock:
            engine = self._engines.get(entry.config_key)
            if engine is not None:
                self._engines.move_to_end(entry.config_key)
                return engine
            while len(self._engines) >= self.settings.engine_max_models:
                self._unload(next(iter(self._engines)))
            engine = self._load(entry)
            self._engines[entry.config_key] = engine
        # A load (torch's and diffusers' imports the first time, then the model) leaves reference
        # cycles, some holding the frames of the request that loaded it and so its decoded input
        # images: freed now, not whenever the collector's young generation next fills.
        gc.collect()
        return engine

    def _load(self, entry: ProviderEntry) -> KontextEngine:
        from ..engine.pipeline import KontextEngine, set_threads

        set_threads(self.settings.engine_threads)
        device, offload = self.settings.device, self.settings.engine_offload
        how: dict[str, Any] = dict(
            offload=offload,
            transformer=self.settings.engine_transformer,
            attention=self.settings.engine_attention,
            compile=self.settings.engine_compile,
        )
        if entry.provider_model_id == TINY_ID:
            return KontextEngine.tiny(device, **how)
        if (weights := self._weights_dir(entry)) and (weights / "model_index.json").is_file():
            return KontextEngine.from_dir(weights, name=entry.config_key, device=device, **how)
        if self.settings.allow_downloads:
            return KontextEngine.from_hub(entry.provider_model_id, name=entry.config_key, device=device, **how)
        raise unavailable(f"Local model {entry.config_key} is not available: {self.unavailable_reason(entry)}.")

    def _unload(self, key: str) -> None:
        """Forget a model and give its memory back (host RAM, and the GPU's cached blocks)."""
        engine = self._engines.pop(key)
        log.info("unloading local model %s (at most %d loaded)", key, self.settings.engine_max_models)
        close = getattr(engine, "close", None)
        if close is not None:
            close()
        del engine
        gc.collect()
        if "torch" in sys.modules:  # never import torch just to free memory
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def loaded_models(self) -> list[str]:
        """Config keys of the loaded models, least recently used first."""
        return list(self._engines)

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
        features, consumed = self._features(job)
        loras = self._resolve_loras(features["loras"])  # before loading a model: a bad path is a quick 400
        engine = self.engine(entry)
        sources = list(job.images)
        input_size = Size(*sources[0].size) if sources else None
        out = output_size(job.size.size, input_size, job.model.max_pixels)
        # Every input image gets its own context size: its preferred Kontext resolution at the output's area.
        contexts = [context_size(Size(*im.size), out) for im in sources]
        steps = job.steps or job.model.default_steps or 28
        guidance = job.guidance if job.guidance is not None else (job.model.default_guidance or 2.5)
        try:
            images = engine.run(
                prompt=job.prompt,
                images=sources,
                contexts=contexts,
                output=out,
                steps=steps,
                guidance=guidance,
                n=job.n,
                seed=job.seed,
                progress=job.progress,
                should_stop=job.cancelled.is_set,
                mask=job.mask,
                negative_prompt=features["negative_prompt"],
                true_cfg_scale=features["true_cfg_scale"],
                loras=loras,
                partial_images=features["partial_images"],
                preview=job.preview,
                acceleration=features["acceleration"],
            )
        except GatewayError:
            raise
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: a server-side failure
            log.exception("local engine failed for %s", job.request_id)
            raise GatewayError(
                f"The local engine failed: {exc}", status=500, type="server_error", code="engine_error"
            ) from exc
        if features["acceleration"] != "none" and engine.last_run is not None and not engine.last_run.applied:
            consumed.discard("acceleration")  # nothing ran faster (diffusers' transformer): say it was ignored
        return ProviderResult(
            images=[ProviderImage(image=im) for im in images],
            size=Size(*images[0].size),
            seed=job.seed,
            ignored_params=sorted(k for k in job.extra if k not in consumed),
            engine=engine.trace(),
        )

    @staticmethod
    def _features(job: ImageJob) -> tuple[dict[str, Any], set[str]]:
        """The engine features of a job: its own fields, else the same names among its extra params."""
        own: dict[str, Any] = {
            "negative_prompt": job.negative_prompt,
            "true_cfg_scale": job.true_cfg_scale,
            "loras": job.loras or None,
            "partial_images": job.partial_images or None,
            "acceleration": None,
        }
        consumed: set[str] = set()
        for name in _FEATURES_IN_EXTRA:
            if own[name] is None and job.extra.get(name) is not None:
                own[name] = job.extra[name]
                consumed.add(name)
        own["loras"] = own["loras"] or []
        own["acceleration"] = own["acceleration"] or "none"
        if own["acceleration"] not in ACCELERATIONS:
            raise invalid(
                f"'acceleration' must be one of {', '.join(ACCELERATIONS)}; got {own['acceleration']!r}.",
                param="acceleration",
            )
        if not isinstance(own["loras"], list):
            raise invalid(
                '\'loras\' must be a list of {"path": ..., "scale": ...}.', param="loras", code="invalid_lora"
            )
        try:
            own["partial_images"] = int(own["partial_images"] or 0)
            if own["true_cfg_scale"] is not None:
                own["true_cfg_scale"] = float(own["true_cfg_scale"])
        except (TypeError, ValueError):
            raise invalid("'true_cfg_scale' and 'partial_images' must be numbers.") from None
        return own, consumed

    def _resolve_loras(self, loras: list[Any]) -> list[LoraSpec]:
        from ..engine.lora import LoraSpec, fetch_url, invalid_lora, is_url, resolve_path

        specs = []
        for item in loras:
            item = item if isinstance(item, dict) else getattr(item, "model_dump", dict)()
            path, scale = item.get("path"), item.get("scale", 1.0)
            if not isinstance(path, str) or not path:
                raise invalid_lora("Each LoRA needs a 'path'.")
            if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
                raise invalid_lora(f"LoRA '{path}': 'scale' must be a number.")
            if is_url(path):
                local = fetch_url(
                    path,
                    self.settings.data_dir / "lora-cache",
                    allow_downloads=self.settings.allow_downloads,
                    allow_private=self.settings.allow_private_urls,
                )
            else:
                local = resolve_path(path, self.settings.lora_dir)
            specs.append(LoraSpec(path=local, scale=float(1.0 if scale is None else scale), name=path))
        return specs

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
