"""An `ImageJob` as plain JSON in the job record, and back: a worker in any process can run it."""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING, Any, cast

from ..catalog import Catalog, Mode
from ..imaging import decode_image
from ..params import Size, SizeRequest
from ..providers.base import ImageJob

if TYPE_CHECKING:
    from ..config import Settings
    from ..store.blobs import BlobStore
    from ..store.records import RequestRow


def to_params(
    job: ImageJob,
    *,
    input_blob_ids: list[str],
    response_format: str,
    requested_model: str | None,
    forced: str | None,
    provider: str | None,
    mask_blob_id: str | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    size = job.size
    return {
        "prompt": job.prompt,
        "requested_model": requested_model,
        "forced_provider": forced,  # a config key given as the model
        "provider": provider,  # the x-provider header
        "size": str(size.size) if size.size else "auto",
        "size_exact": size.exact,
        "aspect_ratio": size.aspect_ratio,
        "resolution": size.tier,
        "n": job.n,
        "seed": job.seed,
        "response_format": response_format,
        "stream": stream,  # answered as events, each image's bytes inline
        "output_format": job.output_format,
        "output_compression": job.output_compression,
        "cfg_scale": job.guidance,
        "num_inference_steps": job.steps,
        "input_blob_ids": input_blob_ids,
        "input_images": [{"width": im.size[0], "height": im.size[1]} for im in job.images],
        "extra": job.extra,
        "negative_prompt": job.negative_prompt,
        "true_cfg_scale": job.true_cfg_scale,
        "loras": job.loras,
        "partial_images": job.partial_images,
        "mask_blob_id": mask_blob_id,  # the mask as the engine takes it: "L", 255 = repaint
    }


async def read_inputs(record: RequestRow, blobs: BlobStore) -> tuple[list[bytes], bytes | None]:
    """The stored bytes of a record's input images and of its mask (None without one), read at once;
    LookupError when one of them is gone."""
    p = record.params
    named = [(f"input image {blob_id}", blob_id) for blob_id in p.get("input_blob_ids", [])]
    if p.get("mask_blob_id"):
        named.append((f"mask {p['mask_blob_id']}", p["mask_blob_id"]))
    stored: list[bytes] = []
    for (what, _), data in zip(named, await asyncio.gather(*(blobs.get(b) for _, b in named)), strict=True):
        if data is None:
            raise LookupError(f"{what} is missing from the blob store")
        stored.append(data)
    if p.get("mask_blob_id"):
        return stored[:-1], stored[-1]
    return stored, None


def from_record(
    record: RequestRow, catalog: Catalog, settings: Settings, *, inputs: list[bytes], mask_bytes: bytes | None
) -> ImageJob:
    """Rebuild the job a record describes, its input images (and mask) decoded again from their stored
    bytes (`read_inputs`)."""
    p = record.params
    images = [decode_image(data, param="image", max_pixels=settings.max_input_pixels) for data in inputs]
    mask = None
    if mask_bytes is not None:
        from PIL import Image

        mask = Image.open(io.BytesIO(mask_bytes)).convert("L")
    size = None
    if p.get("size") and p["size"] != "auto":
        w, _, h = p["size"].partition("x")
        size = Size(int(w), int(h))
    return ImageJob(
        request_id=record.id,
        model=catalog.get(record.model),
        mode=cast(Mode, record.mode),
        prompt=p["prompt"],
        images=images,
        size=SizeRequest(
            size, aspect_ratio=p.get("aspect_ratio"), tier=p.get("resolution"), exact=bool(p.get("size_exact"))
        ),
        n=p["n"],
        seed=p["seed"],
        output_format=p["output_format"],
        output_compression=p.get("output_compression"),
        guidance=p.get("cfg_scale"),
        steps=p.get("num_inference_steps"),
        extra=dict(p.get("extra") or {}),
        mask=mask,
        negative_prompt=p.get("negative_prompt"),
        true_cfg_scale=p.get("true_cfg_scale"),
        loras=list(p.get("loras") or []),
        partial_images=int(p.get("partial_images") or 0),
    )
