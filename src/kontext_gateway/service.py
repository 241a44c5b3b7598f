"""The path of one image request: validate -> normalise -> route -> encode -> store -> respond.

Plain function calls on plain data, from the parsed HTTP fields to the OpenAI `ImagesResponse`
(plus `metadata`). The HTTP layer only parses and renders; this module is what the CLI calls too.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .catalog import Catalog, Mode
from .config import Settings
from .errors import GatewayError, invalid, too_large
from .imaging import EXTENSIONS, decode_image, encode_image, parse_data_url
from .params import CONTROL_FIELDS, PARAM_NAMES, Size, resolve_size
from .protocol import ImageRequest, parse_image_request
from .providers.base import ImageJob, ProgressFn, ProviderImage
from .routing import Router
from .store.blobs import LocalBlobStore, URLSigner
from .store.db import Database

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

BLOB_ROUTE = "/v1/blobs/"


@dataclass
class InputFile:
    """One uploaded or referenced image, still encoded, with the field name it came in under."""

    data: bytes
    param: str = "image"


@dataclass
class ImageOutcome:
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class ImageService:
    def __init__(
        self, settings: Settings, catalog: Catalog, router: Router, db: Database,
        blobs: LocalBlobStore, signer: URLSigner,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.router = router
        self.db = db
        self.blobs = blobs
        self.signer = signer

    async def create(
        self,
        *,
        mode: Mode,
        fields: dict[str, Any],
        files: list[InputFile],
        base_url: str,
        provider: str | None = None,
        key_id: str | None = None,
        progress: ProgressFn | None = None,
    ) -> ImageOutcome:
        request_id = new_request_id()
        endpoint = "images.edits" if mode == "edit" else "images.generations"
        t0 = time.perf_counter()
        try:
            job, candidates, req = await self._prepare(request_id, mode, fields, files, provider, progress)
        except GatewayError as exc:
            # A rejected request is recorded too: the history shows what was asked and why it failed.
            await self.db.create_request(
                id=request_id, endpoint=endpoint, model=str(fields.get("model") or ""), mode=mode,
                params=_safe_params(fields), key_id=key_id,
            )
            await self.db.mark_failed(request_id, error=exc.body()["error"], attempts=[], duration_ms=_ms(t0))
            exc.headers.setdefault("x-request-id", request_id)
            raise

        await self.db.create_request(
            id=request_id, endpoint=endpoint, model=job.model.id, mode=mode,
            params=_job_params(job, req), key_id=key_id,
        )
        await self.db.mark_running(request_id, provider=candidates[0][0].config_key)
        try:
            entry, result = await self.router.run(candidates, job)
            encoded, blob_ids = await asyncio.to_thread(self._encode_and_store, result.images, job)
        except GatewayError as exc:
            await self.db.mark_failed(
                request_id, error=exc.body()["error"], attempts=[a.to_dict() for a in job.attempts],
                duration_ms=_ms(t0), provider=None,
            )
            exc.headers.setdefault("x-request-id", request_id)
            raise
        except asyncio.CancelledError:  # the client went away: record it, let the cancel go on
            await asyncio.shield(self.db.mark_failed(
                request_id, error={"message": "The client closed the connection.", "type": "invalid_request_error",
                                   "param": None, "code": "client_closed_request"},
                attempts=[a.to_dict() for a in job.attempts], duration_ms=_ms(t0), provider=None,
            ))
            raise
        attempts = job.attempts

        price = entry.pricing.price_per_image()
        cost = result.cost if result.cost is not None else round(price * len(encoded), 6)
        produced = result.size
        await self.db.mark_succeeded(
            request_id, provider=entry.config_key, cost=cost, currency=entry.pricing.currency,
            output_blob_ids=blob_ids, attempts=[a.to_dict() for a in attempts],
            output_size=str(produced), output_format=job.output_format, duration_ms=_ms(t0),
        )
        response_format = req.response_format or "url"
        data = []
        for blob_id, raw in zip(blob_ids, encoded):
            item: dict[str, Any] = {"revised_prompt": job.prompt}
            if response_format == "b64_json":
                item["b64_json"] = base64.b64encode(raw).decode()
            else:
                item["url"] = self.blob_url(base_url, blob_id)
            data.append(item)
        ignored = sorted(set(result.ignored_params))
        body = {
            "created": int(time.time()),
            "data": data,
            "size": str(produced),
            "output_format": job.output_format,
            "metadata": {
                "request_id": request_id,
                "model": job.model.id,
                "provider": entry.provider,
                "executed_model": entry.config_key,
                "provider_model_id": entry.provider_model_id,
                "cost": cost,
                "currency": entry.pricing.currency,
                "attempts": [a.to_dict() for a in attempts],
                "seed": result.seed,
                "ignored_params": ignored,
            },
        }
        headers = {"x-request-id": request_id, "x-kontext-provider": entry.config_key, "x-kontext-model": job.model.id}
        return ImageOutcome(body=body, headers=headers, blobs=encoded)

    def blob_url(self, base_url: str, blob_id: str) -> str:
        path = BLOB_ROUTE + blob_id
        base = (self.settings.public_url or base_url).rstrip("/")
        return f"{base}{path}?{self.signer.sign(path, self.settings.url_ttl_seconds)}"

    # -- validation and normalisation --------------------------------------------------------------

    async def _prepare(
        self, request_id: str, mode: Mode, fields: dict[str, Any], files: list[InputFile],
        provider: str | None, progress: ProgressFn | None,
    ) -> tuple[ImageJob, list, ImageRequest]:
        req = parse_image_request(fields)
        model, forced = self.catalog.resolve(req.model or self.settings.default_model)
        if mode not in model.modes:
            supported = " and ".join(model.modes)
            raise invalid(
                f"Model '{model.id}' does not support {_mode_words(mode)}; it supports {supported}.",
                param="model", code="unsupported_mode",
            )
        if req.stream:
            raise invalid("Streaming (stream=true) is not supported yet; omit it to get the whole response.",
                          param="stream", code="unsupported_parameter")
        if req.n > self.settings.max_n:
            raise invalid(f"Invalid 'n': {req.n} is out of range (1 to {self.settings.max_n}).",
                          param="n", code="integer_out_of_range")
        files = files + self._referenced_files(req)
        if mode == "edit" and not files:
            raise invalid("An edit needs an input image: send 'image' (a file) or 'images' [{'image_url'}].",
                          param="image", code="missing_required_parameter")
        if mode == "text-to-image" and files:
            raise invalid("Text-to-image takes no input image; use /v1/images/edits to edit an image.",
                          param="image", code="unsupported_parameter")
        if len(files) > model.max_input_images:
            raise invalid(
                f"Too many input images: {len(files)} given, model '{model.id}' accepts at most "
                f"{model.max_input_images}.", param="image", code="too_many_images",
            )
        images = await asyncio.to_thread(self._decode_inputs, files)  # large decodes stay off the event loop
        input_size = Size(*images[0].size) if images else None
        size = resolve_size(model, size=req.size, aspect_ratio=req.aspect_ratio,
                            resolution=req.resolution, input_size=input_size)
        extra = req.passthrough(PARAM_NAMES | CONTROL_FIELDS)
        job = ImageJob(
            request_id=request_id, model=model, mode=mode, prompt=req.prompt, images=images, size=size,
            n=req.n, seed=req.seed if req.seed is not None else secrets.randbelow(2**32),
            output_format=req.output_format or "png", output_compression=req.output_compression,
            guidance=req.cfg_scale, steps=req.num_inference_steps, extra=extra, progress=progress,
        )
        candidates = self.router.candidates(model, mode, job, forced=forced, provider=provider)
        return job, candidates, req

    def _decode_inputs(self, files: list[InputFile]) -> list["Image"]:
        images = []
        for i, f in enumerate(files):
            param = f.param if len(files) == 1 else f"{f.param}[{i}]"
            if len(f.data) > self.settings.max_file_bytes:
                raise too_large(
                    f"'{param}' is {len(f.data)} bytes; the limit is {self.settings.max_file_bytes} bytes (50 MB).",
                    param=param, code="file_too_large",
                )
            images.append(decode_image(f.data, param=param, max_pixels=self.settings.max_input_pixels))
        return images

    def _referenced_files(self, req: ImageRequest) -> list[InputFile]:
        """Images of the JSON edit form: data URLs inline. Remote fetching is not enabled here."""
        out = []
        for i, ref in enumerate(req.images or []):
            param = f"images[{i}].image_url"
            if ref.image_url is None:
                raise invalid("Each entry of 'images' needs an 'image_url' (file ids are not supported).",
                              param=f"images[{i}]", code="invalid_value")
            if not ref.image_url.startswith("data:"):
                raise invalid("Only data URLs (data:image/png;base64,...) are accepted in 'images' for now.",
                              param=param, code="invalid_image_url")
            out.append(InputFile(parse_data_url(ref.image_url, param=param), param="image"))
        return out

    def _encode_and_store(self, images: list[ProviderImage], job: ImageJob) -> tuple[list[bytes], list[str]]:
        encoded = self._encode_all(images, job)
        return encoded, [self.blobs.put(data, ext=EXTENSIONS[job.output_format]) for data in encoded]

    def _encode_all(self, images: list[ProviderImage], job: ImageJob) -> list[bytes]:
        out = []
        for img in images:
            if img.data is not None and img.format == job.output_format and job.output_compression is None:
                out.append(img.data)  # already what was asked for: keep the provider's bytes
                continue
            pixels = img.image
            if pixels is None:
                pixels = decode_image(img.data or b"", param="output", max_pixels=self.settings.max_input_pixels)
            out.append(encode_image(pixels, job.output_format, compression=job.output_compression))
        return out


def _mode_words(mode: Mode) -> str:
    return "image editing" if mode == "edit" else "text-to-image generation"


def _job_params(job: ImageJob, req: ImageRequest) -> dict[str, Any]:
    return {
        "prompt": job.prompt,
        "requested_model": req.model,
        "size": str(job.size.size) if job.size.size else "auto",
        "aspect_ratio": job.size.aspect_ratio,
        "resolution": job.size.tier,
        "n": job.n,
        "seed": job.seed,
        "response_format": req.response_format or "url",
        "output_format": job.output_format,
        "output_compression": job.output_compression,
        "cfg_scale": job.guidance,
        "num_inference_steps": job.steps,
        "input_images": [{"width": im.size[0], "height": im.size[1]} for im in job.images],
        "extra": {k: v for k, v in job.extra.items() if isinstance(v, (str, int, float, bool, type(None)))},
    }


def _safe_params(fields: dict[str, Any]) -> dict[str, Any]:
    """What a rejected request asked for, without binary payloads."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v if not isinstance(v, str) or len(v) <= 2000 else v[:2000] + "..."
    return out


def _ms(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1000)
