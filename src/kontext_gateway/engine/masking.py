"""Masks for the inpainting path: fitting them to the output, and putting the kept pixels back.

diffusers' FluxKontextInpaintPipeline keeps the unmasked area in latent space: after every step those
latents are reset to the source's. The picture that comes out is still a VAE decode, so the kept area
is the VAE's round trip of the source, not the source: with FLUX's VAE a slight softening and colour
drift that adds up over a chain of edits, and with kontext-tiny's random VAE another picture entirely.
(Its GroupNorm layers also make every decoded pixel depend a little on the whole latent.) So after
decoding, the source's own pixels are composited back where the mask keeps them, through a mask
feathered by a few pixels so the seam does not show. Where the mask is 0, away from the seam, the
output is the source, pixel for pixel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image


def fit_mask(mask: Image, size: tuple[int, int]) -> Image:
    """The mask as "L" at `size`, binarised at half (the pipeline binarises its own copy the same way)."""
    from PIL import Image as PILImage

    area = mask.convert("L")
    if area.size != size:
        area = area.resize(size, PILImage.Resampling.BILINEAR)
    return area.point(lambda v: 255 if v >= 128 else 0)


def feather_radius(size: tuple[int, int]) -> int:
    """About 1/128 of the short side: 8 px at 1024, 1 px for tiny test pictures."""
    return max(1, round(min(size) / 128))


def keep_unmasked(result: Image, source: Image, mask: Image) -> Image:
    """`result` where the (fitted) mask repaints, `source` where it keeps, blended across the seam."""
    from PIL import Image as PILImage
    from PIL import ImageChops, ImageFilter

    blurred = mask.filter(ImageFilter.GaussianBlur(feather_radius(mask.size)))
    # Blurring lowers the repainted side of the seam too: take the brighter of the two so the
    # repainted area stays fully repainted and only the kept side fades in.
    alpha = ImageChops.lighter(blurred, mask)
    return PILImage.composite(result.convert("RGB"), source.convert("RGB"), alpha)
