"""An `ImageJob` as plain JSON in the job record, and back: a worker in any process can run it."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, cast

from ..catalog import Catalog, Mode
from ..imaging import decode_image
from ..params import Size, SizeRequest
from ..providers.base import ImageJob

if TYPE_CHECKING:
    from ..config import Settings
    from ..store.blobs import LocalBlobStore
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


def from_record(record: RequestRow, catalog: Catalog, blobs: LocalBlobStore, settings: Settings) -> ImageJob:
    """Rebuild the job a record describes; input images are decoded again from the blob store."""
    p = record.params
    images = []
    for blob_id in p.get("input_blob_ids", []):
        data = blobs.get(blob_id)
        if data is None:
            raise LookupError(f"input image {blob_id} is missing from the blob store")
        images.append(decode_image(data, param="image", max_pixels=settings.max_input_pixels))
    mask = None
    if p.get("mask_blob_id"):
        data = blobs.get(p["mask_blob_id"])
        if data is None:
            raise LookupError(f"mask {p['mask_blob_id']} is missing from the blob store")
        from PIL import Image

        mask = Image.open(io.BytesIO(data)).convert("L")
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
