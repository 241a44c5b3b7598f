"""Running FLUX.1 Kontext with diffusers' FluxKontextPipeline: loading, devices, one call per job.

One loaded model (`KontextEngine`) serves every feature from the same weights: several context images
and true CFG (engine/context.py's pipeline subclass), masks (diffusers' FluxKontextInpaintPipeline built
from the same components), LoRA adapters (engine/lora.py), previews (engine/previews.py) and a cache of
encoded context images. Everything here imports torch, so it is imported only when a local model is
first used.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import invalid
from ..params import Size
from .lora import AdapterCache, LoraSpec

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised from the step callback when the caller no longer wants the picture."""


def quiet_libraries() -> None:
    """diffusers and transformers warn about optional backends (torchvision...) we do not use."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def pick_device(preferred: str | None = None) -> tuple[str, Any]:
    """CUDA in bf16 when available, else CPU in fp32 (bf16 on CPU is slow and lossy)."""
    import torch

    device = preferred or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, dtype


CONTEXT_CACHE_ENTRIES = 8


def use_lean(pipe: Any, *, model: Any = None) -> Any:
    """Swap the pipeline's diffusers transformer for the lean one on the same weights (or for `model`,
    already loaded), on the same device and dtype, and free the diffusers copy."""
    from .lean.adapter import LeanTransformer
    from .lean.weights import from_diffusers_model

    if model is None:
        model = from_diffusers_model(pipe.transformer)
    pipe.transformer = None  # the diffusers model's memory goes before anything else is allocated
    gc.collect()
    pipe.register_modules(transformer=LeanTransformer(model))
    return pipe


def place(pipe: Any, device: str, offload: str = "none") -> str:
    """Put the pipeline on its device, or set up diffusers' CPU offload (CUDA only: weights live in
    host memory and move to the GPU per component ("model") or per layer ("sequential") while they
    run). Returns the offload mode in effect."""
    if offload != "none" and not device.startswith("cuda"):
        log.info("engine_offload=%s only applies on CUDA; running on %s without it", offload, device)
        offload = "none"
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return offload


@dataclass
class RunInfo:
    """What the last run did (tests and logs read it)."""

    mode: str  # "kontext" or "inpaint"
    noise_tokens: int
    context_tokens: list[int] = field(default_factory=list)  # per context image, in placement order
    true_cfg: bool = False
    previews: int = 0
    loras: list[str] = field(default_factory=list)
    transformer: str = "diffusers"
    acceleration: str = "none"
    applied: list[str] = field(default_factory=list)  # accelerations that ran: "fp8", "step_cache"
    transformer_calls: int = 0  # forward calls asked for (steps x passes), lean transformer only
    transformer_computed: int = 0  # of which ran the network (fewer with the step cache)


class KontextEngine:
    def __init__(
        self,
        pipe: Any,
        *,
        name: str,
        device: str,
        dtype: Any,
        offload: str = "none",
        attention: str = "auto",
        compile: bool = False,
    ) -> None:
        from .lean.adapter import LeanTransformer

        self.pipe = pipe
        self.transformer = "lean" if isinstance(pipe.transformer, LeanTransformer) else "diffusers"
        self.attention = "sdpa"
        if self.transformer == "lean":  # picked for the device it runs on (offloaded models come to it)
            self.attention = pipe.transformer.model.use_attention(attention, device=device)
            if compile:
                pipe.transformer.model.compile_blocks()
        self.compiled = compile and self.transformer == "lean"
        self.name = name
        self.device = device
        self.dtype = dtype
        self.offload = offload  # as placed by the factory (see `place`)
        pipe.set_progress_bar_config(disable=True)
        quiet_libraries()
        from .context import ContextLatentCache  # imports diffusers' pipelines: after quieting them

        self.context_cache = ContextLatentCache(CONTEXT_CACHE_ENTRIES)
        self.adapters = AdapterCache(pipe)
        self.last_run: RunInfo | None = None
        self._runners: dict[str, Any] = {}  # "kontext" / "inpaint" -> pipeline subclass on these weights

    @classmethod
    def tiny(
        cls,
        device: str | None = None,
        *,
        offload: str = "none",
        transformer: str = "diffusers",
        attention: str = "auto",
        compile: bool = False,
    ) -> KontextEngine:
        from .tiny import build_tiny_pipeline

        quiet_libraries()
        t0 = time.perf_counter()
        device, dtype = pick_device(device)
        pipe = build_tiny_pipeline().to(dtype=dtype)
        offload = place(pipe, device, offload)
        if transformer == "lean":
            use_lean(pipe)
        log.info("built kontext-tiny on %s in %.2fs", device, time.perf_counter() - t0)
        return cls(
            pipe, name="kontext-tiny", device=device, dtype=dtype, offload=offload, attention=attention, compile=compile
        )

    @classmethod
    def from_dir(
        cls,
        path: Path,
        *,
        name: str,
        device: str | None = None,
        offload: str = "none",
        transformer: str = "diffusers",
        attention: str = "auto",
        compile: bool = False,
    ) -> KontextEngine:
        """Load weights in diffusers layout (model_index.json + component folders) from local disk. The lean
        transformer is read straight from `transformer/` (the diffusers model is never built)."""
        from diffusers import FluxKontextPipeline

        quiet_libraries()
        t0 = time.perf_counter()
        device, dtype = pick_device(device)
        if transformer == "lean":
            from .lean.weights import from_diffusers_dir

            pipe = FluxKontextPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True, transformer=None)
            lean = from_diffusers_dir(path, dtype=dtype, device="cpu" if offload != "none" else device)
            use_lean(pipe, model=lean)
        else:
            pipe = FluxKontextPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        offload = place(pipe, device, offload)
        log.info("loaded %s from %s on %s in %.2fs", name, path, device, time.perf_counter() - t0)
        return cls(pipe, name=name, device=device, dtype=dtype, offload=offload, attention=attention, compile=compile)

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        *,
        name: str,
        device: str | None = None,
        offload: str = "none",
        transformer: str = "diffusers",
        attention: str = "auto",
        compile: bool = False,
    ) -> KontextEngine:
        """Download from the Hugging Face hub: only when the operator allowed downloads."""
        from diffusers import FluxKontextPipeline

        device, dtype = pick_device(device)
        pipe = FluxKontextPipeline.from_pretrained(repo_id, dtype=dtype)
        offload = place(pipe, device, offload)
        if transformer == "lean":
            use_lean(pipe)
        return cls(pipe, name=name, device=device, dtype=dtype, offload=offload, attention=attention, compile=compile)

    def trace(self) -> dict[str, Any]:
        """What the last run did, for the request's trace: transformer, attention, acceleration asked
        and applied, transformer passes computed of those asked."""
        info = self.last_run
        out: dict[str, Any] = {"transformer": self.transformer}
        if self.transformer == "lean":
            out["attention"] = self.attention
            if self.compiled:
                out["compiled"] = True
        if info is not None:
            out.update(acceleration=info.acceleration, applied=list(info.applied))
            if info.transformer_calls:
                out.update(transformer_calls=info.transformer_calls, transformer_computed=info.transformer_computed)
        return out

    def save(self, path: Path) -> None:
        self.pipe.save_pretrained(str(path))

    def close(self) -> None:
        """Drop every reference to the weights and give the memory back (the model cache calls this)."""
        import torch

        self.context_cache.clear()
        self._runners.clear()
        self.adapters = None  # type: ignore[assignment]
        self.pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _runner(self, kind: str) -> Any:
        """The pipeline subclass for `kind`, sharing this engine's components (no weight copies)."""
        runner = self._runners.get(kind)
        if runner is None:
            from .context import MultiContextInpaintPipeline, MultiContextKontextPipeline

            cls = MultiContextInpaintPipeline if kind == "inpaint" else MultiContextKontextPipeline
            runner = cls(**self.pipe.components)
            runner.set_progress_bar_config(disable=True)
            self._runners[kind] = runner
        return runner

    def run(
        self,
        *,
        prompt: str,
        output: Size,
        steps: int,
        guidance: float,
        n: int,
        seed: int,
        image: Image | None = None,
        context: Size | None = None,
        images: list[Image] | None = None,
        contexts: Sequence[Size | None] | None = None,
        negative_prompt: str | None = None,
        true_cfg_scale: float | None = None,
        mask: Image | None = None,
        loras: list[LoraSpec] | None = None,
        placement: str = "offset",
        acceleration: str = "none",
        partial_images: int = 0,
        preview: Callable[[int, Image], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Image]:
        """Make `n` pictures. Context images: `images` with one context size each (`contexts`), or the
        single `image`/`context` pair; each is resized to its size and becomes its own context tokens.
        With `mask` (same size as the first image; 255 = repaint) the first image is repainted where
        the mask is set, the others are references. True CFG runs when true_cfg_scale > 1 and a
        negative prompt is given (two transformer passes per step), as in diffusers. `acceleration`
        ("none", "regular": fp8 linears, "high": fp8 and the step cache) needs the lean transformer;
        with diffusers' it is not applied (RunInfo.applied says what was)."""
        import torch
        from PIL import Image as PILImage

        from .context import encode_context
        from .masking import fit_mask, keep_unmasked
        from .previews import PreviewEmitter

        pictures = list(images) if images is not None else ([image] if image is not None else [])
        sizes = list(contexts) if contexts is not None else [context] * len(pictures)
        if len(sizes) != len(pictures):
            raise ValueError("one context size per input image")
        if mask is not None and not pictures:
            raise invalid("A mask needs an input image to repaint.", param="mask")
        if loras and self.transformer == "lean":
            from .lora import invalid_lora

            raise invalid_lora(
                "LoRA adapters run on the diffusers transformer; this server runs the lean one "
                "(KONTEXT_ENGINE_TRANSFORMER=lean). Ask its operator, or send the request "
                "without 'loras'."
            )
        self.adapters.activate(list(loras or []))
        inpaint = None  # (source at the output size, fitted mask)
        if mask is not None:
            target = (output.width, output.height)
            source = (
                pictures[0] if pictures[0].size == target else pictures[0].resize(target, PILImage.Resampling.LANCZOS)
            )
            inpaint = (source, fit_mask(mask, target))
            if preview is not None:  # previews show the kept area as the result will
                shown, kept = preview, inpaint

                def preview_kept(i: int, im: Any) -> None:
                    shown(i, keep_unmasked(im, *kept))

                preview = preview_kept
        emitter = PreviewEmitter(steps, partial_images, preview, output.height, output.width)

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if should_stop is not None and should_stop():
                raise Interrupted()
            if progress is not None:
                progress(i + 1, steps)
            emitter.on_step(pipe, i + 1, kwargs)
            return kwargs

        cfg = true_cfg_scale if true_cfg_scale is not None else 1.0
        common: dict[str, Any] = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            true_cfg_scale=cfg,
            height=output.height,
            width=output.width,
            # diffusers rescales every output to max_area: pass the exact area to keep WxH.
            max_area=output.area,
            # Context images are already at their target sizes; keep them as they are.
            _auto_resize=False,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            # A CPU generator draws the same noise on every device: same seed, same picture.
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
            callback_on_step_end=on_step,
            callback_on_step_end_tensor_inputs=["latents", "noise_pred"] if emitter.active else ["latents"],
        )

        def latents_of(pics: list[Any], fits: list[Size | None]) -> list[Any]:
            return [
                encode_context(self.pipe, im, (s.width, s.height) if s else None, self.context_cache)
                for im, s in zip(pics, fits, strict=False)
            ]

        runner = self._runner("kontext" if inpaint is None else "inpaint")
        lean = self.transformer == "lean"
        request = self.pipe.transformer.request(runner.scheduler, acceleration) if lean else nullcontext(None)
        try:
            with torch.inference_mode(), request as stats:
                if inpaint is None:
                    with runner.using(latents_of(pictures, sizes), placement):
                        result = runner(image=None, **common)
                else:
                    source, area = inpaint
                    with runner.using(latents_of(pictures[1:], sizes[1:]), placement):
                        # strength 1: the masked area starts from pure noise; the rest is put back
                        # from the source's latents after every step...
                        result = runner(image=source, mask_image=area, image_reference=None, strength=1.0, **common)
                    # ...and, decoded, from the source's own pixels (see engine/masking.py).
                    result.images = [keep_unmasked(im, source, area) for im in result.images]
        finally:
            if self.offload == "model":
                self.pipe.maybe_free_model_hooks()  # the runners share the hooks; park everything again
        self.last_run = RunInfo(
            mode="inpaint" if mask is not None else "kontext",
            noise_tokens=runner.last_noise_tokens,
            context_tokens=list(runner.last_context_tokens),
            true_cfg=cfg > 1 and negative_prompt is not None,
            previews=emitter.sent,
            loras=[spec.name or spec.path.name for spec in loras or []],
            transformer=self.transformer,
            acceleration=acceleration,
            applied=list(stats.applied) if stats else [],
            transformer_calls=stats.calls if stats else 0,
            transformer_computed=stats.computed if stats else 0,
        )
        return list(result.images)
