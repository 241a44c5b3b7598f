"""Context images: VAE latents (cached), their placement as context tokens, and the pipelines that take several.

FLUX.1 Kontext sees an input picture as extra tokens appended after the noise tokens, with RoPE ids
equal to a noise token's except axis 0 = 1. Several pictures are not native to diffusers (a list is a
batch), so we follow ComfyUI, whose placements Kontext workflows and LoRAs were made with:

- "offset" (ComfyUI's default, and ours): every reference keeps axis-0 index 1 and the references are
  tiled on one virtual canvas through row/column id offsets, each placed to the right of or below
  what is already there (whichever keeps the canvas squarer). The model sees one bigger context image.
- "index": reference i gets axis-0 index i+1 and no offsets: separate "frames".

A single reference is index 1 with no offset under both, exactly as diffusers places it, so one input
image gives the same bytes as the stock pipeline.

The pipelines below change only `prepare_latents`: the rest of diffusers' loop (true CFG, the scheduler,
callbacks, decoding) runs unchanged. The caller hands over already-encoded context latents, which is
also what makes the latent cache possible: a chain of edits on the same picture encodes it once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers import FluxKontextInpaintPipeline, FluxKontextPipeline

if TYPE_CHECKING:
    from PIL.Image import Image

Placement = Literal["offset", "index"]
PLACEMENTS: tuple[str, ...] = ("offset", "index")
MULTIPLE = 16  # VAE downsampling (8) x patch size (2)


def placements(shapes: list[tuple[int, int]], method: Placement = "offset") -> list[tuple[int, int, int]]:
    """(axis-0 index, row offset, column offset) in token units for references of (rows, cols) tokens.

    ComfyUI's rule (comfy/ldm/flux/model.py), which counts in latent pixels; token units are the same
    rule divided by the patch size, as latent sides are even."""
    if method not in PLACEMENTS:
        raise ValueError(f"unknown placement {method!r}")
    out: list[tuple[int, int, int]] = []
    h = w = 0
    for i, (rows, cols) in enumerate(shapes):
        if method == "index":
            out.append((i + 1, 0, 0))
            continue
        h_off = w_off = 0
        if rows + h > cols + w:
            w_off = w
        else:
            h_off = h
        h = max(h, rows + h_off)
        w = max(w, cols + w_off)
        out.append((1, h_off, w_off))
    return out


def pack_context(
    pipe: Any, latents: list[Any], batch: int, method: Placement, *, first: tuple[Any, Any] | None = None
) -> tuple[Any, Any, list[int]]:
    """Packed context tokens (B, sum of tokens, 64), their ids (sum, 3) and per-image token counts.

    `latents` are (1, 16, h, w) normalised VAE latents. `first` is an already packed (tokens, ids) pair
    placed before them (the inpainting pipeline's own context image), taking the first placement slot."""
    shapes = [(lat.shape[2] // 2, lat.shape[3] // 2) for lat in latents]
    tokens, ids, counts = [], [], []
    if first is not None:
        rows = int(first[1][:, 1].max().item()) + 1
        cols = int(first[1][:, 2].max().item()) + 1
        shapes.insert(0, (rows, cols))
        tokens.append(first[0])
        ids.append(first[1])
        counts.append(first[0].shape[1])
    slots = placements(shapes, method)[len(tokens) :]
    for lat, (index, h_off, w_off) in zip(latents, slots, strict=False):
        lat = lat.expand(batch, -1, -1, -1) if batch > 1 else lat
        channels, height, width = lat.shape[1:]
        packed = pipe._pack_latents(lat, batch, channels, height, width)
        pos = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, lat.device, lat.dtype)
        pos[..., 0] = index
        pos[..., 1] += h_off
        pos[..., 2] += w_off
        tokens.append(packed)
        ids.append(pos)
        counts.append(packed.shape[1])
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0), counts


class _MultiContext:
    """What both pipelines share: the per-call context, the last call's token counts, and `noise_pred`
    made visible to step callbacks (previews decode the predicted clean image from it)."""

    # Class-level defaults, each replaced per call on the instance (never mutated in place).
    _callback_tensor_inputs = ["latents", "prompt_embeds", "noise_pred"]  # noqa: RUF012
    _ctx_latents: list[Any] = []  # noqa: RUF012
    _ctx_placement: Placement = "offset"
    last_context_tokens: list[int] = []  # noqa: RUF012
    last_noise_tokens: int = 0

    @contextmanager
    def using(self, latents: list[Any], placement: Placement = "offset") -> Iterator[None]:
        self._ctx_latents, self._ctx_placement = list(latents), placement
        try:
            yield
        finally:
            self._ctx_latents = []


class MultiContextKontextPipeline(_MultiContext, FluxKontextPipeline):
    """FluxKontextPipeline whose context is the encoded latents set with `using(...)`; call it with
    image=None. Built from an existing pipeline's components: no second copy of the weights."""

    def prepare_latents(
        self, image, batch_size, num_channels_latents, height, width, dtype, device, generator=None, latents=None
    ):
        latents, _, latent_ids, _ = super().prepare_latents(
            None, batch_size, num_channels_latents, height, width, dtype, device, generator, latents
        )
        self.last_noise_tokens = latents.shape[1]
        if not self._ctx_latents:
            self.last_context_tokens = []
            return latents, None, latent_ids, None
        ctx = [lat.to(device=device, dtype=dtype) for lat in self._ctx_latents]
        tokens, ids, self.last_context_tokens = pack_context(self, ctx, batch_size, self._ctx_placement)
        return latents, tokens, latent_ids, ids


class MultiContextInpaintPipeline(_MultiContext, FluxKontextInpaintPipeline):
    """FluxKontextInpaintPipeline that appends the latents set with `using(...)` as further references
    after its own context image (the picture being repainted)."""

    def prepare_latents(
        self,
        image,
        timestep,
        batch_size,
        num_channels_latents,
        height,
        width,
        dtype,
        device,
        generator=None,
        latents=None,
        image_reference=None,
    ):
        out = list(
            super().prepare_latents(
                image,
                timestep,
                batch_size,
                num_channels_latents,
                height,
                width,
                dtype,
                device,
                generator,
                latents,
                image_reference,
            )
        )
        latents, image_latents, ref_latents, _latent_ids, image_ids, ref_ids, _noise = out
        self.last_noise_tokens = latents.shape[1]
        base = (ref_latents, ref_ids) if ref_latents is not None else (image_latents, image_ids)
        if not self._ctx_latents:
            self.last_context_tokens = [base[0].shape[1]]
            return tuple(out)
        ctx = [lat.to(device=device, dtype=dtype) for lat in self._ctx_latents]
        tokens, ids, self.last_context_tokens = pack_context(self, ctx, batch_size, self._ctx_placement, first=base)
        out[2], out[5] = tokens, ids  # the loop appends image_reference_* as the context
        return tuple(out)

    def prepare_mask_latents(
        self,
        mask,
        masked_image,
        batch_size,
        num_channels_latents,
        num_images_per_prompt,
        height,
        width,
        dtype,
        device,
        generator,
    ):
        """diffusers VAE-encodes the masked picture here and drops the result (Kontext inpainting uses
        only the mask). A 16-channel stand-in, which diffusers takes as latents as they are, skips that
        encode: the same bytes, -12 % on a 256x256 mask edit (benchmarks/RESULTS.md, section 9)."""
        import torch

        if masked_image.shape[1] != 16 and self.vae.config.latent_channels == 16:
            h = 2 * (int(height) // (self.vae_scale_factor * 2))
            w = 2 * (int(width) // (self.vae_scale_factor * 2))
            masked_image = torch.zeros((masked_image.shape[0], 16, h, w), dtype=dtype, device=device)
        return super().prepare_mask_latents(
            mask,
            masked_image,
            batch_size,
            num_channels_latents,
            num_images_per_prompt,
            height,
            width,
            dtype,
            device,
            generator,
        )


def fit_for_context(pipe: Any, image: Image, size: tuple[int, int] | None) -> Any:
    """The pixel tensor diffusers would encode for this picture: LANCZOS-resized to `size` (the context
    size chosen by engine/resolution.py), else its own size floored to a multiple of 16, then the
    pipeline's own resize and preprocess (identical steps to FluxKontextPipeline with _auto_resize off)."""
    from PIL import Image as PILImage

    if size is not None and image.size != size:
        image = image.resize(size, PILImage.Resampling.LANCZOS)
    height, width = pipe.image_processor.get_default_height_width(image)
    width, height = width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE
    image = pipe.image_processor.resize(image, height, width)
    return pipe.image_processor.preprocess(image, height, width)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class ContextLatentCache:
    """A small LRU of encoded context images, keyed by a hash of the pixels and the target size.

    Iterative editing feeds yesterday's output back as today's input: the VAE encode of the same picture
    at the same size is then skipped. Latents are small (16 x h/8 x w/8: 0.5 MiB for 1024x1024 in bf16)."""

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(image: Image, size: tuple[int, int] | None, extra: tuple[Any, ...] = ()) -> tuple[Any, ...]:
        digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
        return (digest, image.mode, image.size, size, *extra)

    def get_or_encode(self, key: tuple[Any, ...], encode: Any) -> Any:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return hit
            self.stats.misses += 1
        value = encode()
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def encode_context(pipe: Any, image: Image, size: tuple[int, int] | None, cache: ContextLatentCache | None) -> Any:
    """Normalised VAE latents (1, 16, h/8, w/8) of one context picture, as FluxKontextPipeline makes them
    (the distribution's mode, then shift and scale), through the cache when one is given."""
    device = pipe._execution_device
    dtype = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else pipe.vae.dtype

    def encode() -> Any:
        pixels = fit_for_context(pipe, image, size).to(device=device, dtype=dtype)
        return pipe._encode_vae_image(image=pixels, generator=None)

    if cache is None:
        return encode()
    return cache.get_or_encode(ContextLatentCache.key(image, size, (str(device), str(dtype))), encode)
