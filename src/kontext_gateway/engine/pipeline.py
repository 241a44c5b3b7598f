"""Running FLUX.1 Kontext with diffusers' FluxKontextPipeline: loading, devices, one call per job.

Everything here imports torch, so it is imported only when a local model is first used.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..params import Size

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


class KontextEngine:
    def __init__(self, pipe: Any, *, name: str, device: str, dtype: Any) -> None:
        self.pipe = pipe
        self.name = name
        self.device = device
        self.dtype = dtype
        pipe.set_progress_bar_config(disable=True)
        quiet_libraries()

    @classmethod
    def tiny(cls, device: str | None = None) -> "KontextEngine":
        from .tiny import build_tiny_pipeline

        quiet_libraries()
        t0 = time.perf_counter()
        device, dtype = pick_device(device)
        pipe = build_tiny_pipeline().to(device=device, dtype=dtype)
        log.info("built kontext-tiny on %s in %.2fs", device, time.perf_counter() - t0)
        return cls(pipe, name="kontext-tiny", device=device, dtype=dtype)

    @classmethod
    def from_dir(cls, path: Path, *, name: str, device: str | None = None) -> "KontextEngine":
        """Load weights in diffusers layout (model_index.json + component folders) from local disk."""
        from diffusers import FluxKontextPipeline

        quiet_libraries()
        t0 = time.perf_counter()
        device, dtype = pick_device(device)
        pipe = FluxKontextPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
        pipe.to(device)
        log.info("loaded %s from %s on %s in %.2fs", name, path, device, time.perf_counter() - t0)
        return cls(pipe, name=name, device=device, dtype=dtype)

    @classmethod
    def from_hub(cls, repo_id: str, *, name: str, device: str | None = None) -> "KontextEngine":
        """Download from the Hugging Face hub: only when the operator allowed downloads."""
        from diffusers import FluxKontextPipeline

        device, dtype = pick_device(device)
        pipe = FluxKontextPipeline.from_pretrained(repo_id, torch_dtype=dtype)
        pipe.to(device)
        return cls(pipe, name=name, device=device, dtype=dtype)

    def save(self, path: Path) -> None:
        self.pipe.save_pretrained(str(path))

    def run(
        self,
        *,
        prompt: str,
        image: "Image | None",
        output: Size,
        context: Size | None,
        steps: int,
        guidance: float,
        n: int,
        seed: int,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list["Image"]:
        import torch

        if image is not None and context is not None and image.size != (context.width, context.height):
            from PIL import Image as PILImage

            image = image.resize((context.width, context.height), PILImage.Resampling.LANCZOS)

        def on_step(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if should_stop is not None and should_stop():
                raise Interrupted()
            if progress is not None:
                progress(i + 1, steps)
            return kwargs

        # A CPU generator draws the same noise on every device: same seed, same picture.
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.inference_mode():
            result = self.pipe(
                image=image,
                prompt=prompt,
                height=output.height,
                width=output.width,
                # diffusers rescales every output to max_area: pass the exact area to keep WxH.
                max_area=output.area,
                # The context image is already at its target size; keep it as it is.
                _auto_resize=False,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=n,
                generator=generator,
                output_type="pil",
                callback_on_step_end=on_step,
            )
        return list(result.images)
