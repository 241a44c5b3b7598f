"""Partial images while a picture is made (OpenAI's `partial_images` with `stream=true`).

A preview is the model's current guess of the finished picture, not the noisy latents: after step i
the latents sit at noise level sigma (the scheduler's next sigma) and the step's velocity v is known,
so the predicted clean latents are x0 = latents - sigma * v (rectified flow: x_sigma = (1 - sigma) x0
+ sigma * noise, v = noise - x0). These are unpacked and decoded with the model's own VAE at the output
size, for the first picture of the batch. That costs one VAE decode per preview (a fraction of one
transformer step at 1024x1024) and reads no weights but the VAE's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

PreviewFn = Callable[[int, "Image"], None]


def preview_steps(steps: int, count: int) -> list[int]:
    """Completed-step numbers (1-based) after which to send previews: `count` evenly spaced steps
    before the last one. With fewer steps than that, one after each step but the last (OpenAI too may
    send fewer partial images than asked when the picture is done sooner)."""
    if count <= 0 or steps <= 1:
        return []
    count = min(count, steps - 1)
    # round((j + 1) * steps / (count + 1)), halves up; distinct and within 1..steps-1 as count < steps
    return [((j + 1) * 2 * steps + count + 1) // (2 * (count + 1)) for j in range(count)]


def predicted_image(pipe: Any, latents: Any, noise_pred: Any, height: int, width: int) -> Image:
    """Decode x0 = latents - sigma * v for the first batch item (see the module docstring)."""
    import torch

    scheduler = pipe.scheduler
    sigma = scheduler.sigmas[scheduler.step_index] if scheduler.step_index is not None else 0.0
    x0 = latents[:1].float() - float(sigma) * noise_pred[:1].float()
    x0 = pipe._unpack_latents(x0, height, width, pipe.vae_scale_factor)
    x0 = x0 / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    with torch.inference_mode():
        pixels = pipe.vae.decode(x0.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


class PreviewEmitter:
    """Called from the step callback; sends previews at the scheduled steps. A preview consumer that
    fails (a client gone) stops the previews, not the picture."""

    def __init__(self, steps: int, count: int, send: PreviewFn | None, height: int, width: int) -> None:
        self.at = set(preview_steps(steps, count)) if send is not None else set()
        self.send = send
        self.height, self.width = height, width
        self.sent = 0

    @property
    def active(self) -> bool:
        return bool(self.at)

    def on_step(self, pipe: Any, done: int, tensors: dict[str, Any]) -> None:
        if done not in self.at or self.send is None:
            return
        try:
            image = predicted_image(pipe, tensors["latents"], tensors["noise_pred"], self.height, self.width)
            self.send(self.sent, image)
            self.sent += 1
        except Exception:
            log.warning("preview failed; no more previews for this picture", exc_info=True)
            self.at = set()
