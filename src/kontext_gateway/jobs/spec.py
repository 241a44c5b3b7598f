"""An `ImageJob` as plain JSON in the job record, and back: a worker in any process can run it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..catalog import Catalog
from ..imaging import decode_image
from ..params import Size, SizeRequest
from ..providers.base import ImageJob

if TYPE_CHECKING:
    from ..config import Settings
    from ..store.blobs import LocalBlobStore


def to_params(job: ImageJob, *, input_blob_ids: list[str], response_format: str, requested_model: str | None,
              forced: str | None, provider: str | None) -> dict[str, Any]:
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
    }


def from_record(record: dict[str, Any], catalog: Catalog, blobs: "LocalBlobStore", settings: "Settings") -> ImageJob:
    """Rebuild the job a record describes; input images are decoded again from the blob store."""
    p = record["params"]
    images = []
    for blob_id in p.get("input_blob_ids", []):
        data = blobs.get(blob_id)
        if data is None:
            raise LookupError(f"input image {blob_id} is missing from the blob store")
        images.append(decode_image(data, param="image", max_pixels=settings.max_input_pixels))
    size = None
    if p.get("size") and p["size"] != "auto":
        w, _, h = p["size"].partition("x")
        size = Size(int(w), int(h))
    return ImageJob(
        request_id=record["id"], model=catalog.get(record["model"]), mode=record["mode"], prompt=p["prompt"],
        images=images, size=SizeRequest(size, aspect_ratio=p.get("aspect_ratio"), tier=p.get("resolution"),
                                        exact=bool(p.get("size_exact"))),
        n=p["n"], seed=p["seed"], output_format=p["output_format"], output_compression=p.get("output_compression"),
        guidance=p.get("cfg_scale"), steps=p.get("num_inference_steps"), extra=dict(p.get("extra") or {}),
    )
