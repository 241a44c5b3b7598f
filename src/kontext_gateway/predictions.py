"""Replicate-style predictions on the same jobs as the Images API: create, get, list, cancel.

A prediction's `input` takes Replicate's Kontext field names (`input_image`, `aspect_ratio` with
`match_input_image`, `output_format: jpg`, `guidance`, `num_inference_steps`, `output_quality`,
`num_outputs`, ...) and the unified ones. Input images are data URIs, this gateway's own file or
image URLs (read from the store), or outside http(s) URLs (fetched, refusing private addresses
unless the operator allows them).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import safejson
from .errors import GatewayError, invalid, not_found
from .imaging import parse_data_url
from .keys import OPEN, Principal
from .service import BLOB_ROUTE, InputFile

if TYPE_CHECKING:
    from .gateway import Gateway

FILES_ROUTE = "/v1/files/"
MAX_CURSOR_CHARS = 512  # ours are about 120
EVENTS = ("start", "output", "logs", "completed")
# Replicate's names for unified parameters (the rest, e.g. guidance, are aliases in protocol.py).
RENAMES = {"output_quality": "output_compression", "num_outputs": "n"}
SINGLE_IMAGE_KEYS = ("input_image", "image", "image_url")
LIST_IMAGE_KEYS = ("input_images", "images", "image_urls")


class PredictionService:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def create(
        self,
        *,
        model: str | None,
        body: dict[str, Any],
        base_url: str,
        wait: float | None,
        principal: Principal = OPEN,
        request_id: str | None = None,
        provider: str | None = None,
    ) -> dict[str, Any]:
        """`provider`: the `x-provider` header, as on the Images API (one provider, no failover)."""
        mode, fields, files, recorded, version, webhook, events = await self._request(model, body, base_url, principal)
        rid = await self.gw.images.submit(
            mode=mode,
            fields=fields,
            files=files,
            principal=principal,
            input=recorded,
            provider=provider,
            version=version if isinstance(version, str) else None,
            webhook=webhook,
            webhook_events=events,
            endpoint="predictions",
            request_id=request_id,
            waiter=bool(wait),
        )
        if wait:
            record = await self.gw.images.wait(rid, timeout=wait, cancel_on_abandon=False)
        else:
            record = await self.gw.db.get_request(rid) or {}
        return self.render(record, base_url)

    async def estimate(
        self,
        *,
        model: str | None,
        body: dict[str, Any],
        base_url: str,
        principal: Principal = OPEN,
        provider: str | None = None,
    ) -> dict[str, Any]:
        """`dryRun`: the prediction validated and priced, not created."""
        mode, fields, files, _, _, _, _ = await self._request(model, body, base_url, principal)
        return await self.gw.images.estimate(
            mode=mode, fields=fields, files=files, principal=principal, provider=provider
        )

    async def _request(
        self, model: str | None, body: dict[str, Any], base_url: str, principal: Principal = OPEN
    ) -> tuple[Any, ...]:
        """The prediction body as the Images API's fields and files (images fetched)."""
        version = body.get("version")
        name = model or body.get("model") or (version.split(":", 1)[0] if isinstance(version, str) else None)
        if not name:
            raise invalid(
                "Name the model: POST /v1/models/{owner}/{name}/predictions, or 'model' / 'version'.",
                param="model",
                code="missing_required_parameter",
            )
        inputs = body.get("input")
        if not isinstance(inputs, dict):
            raise invalid(
                "'input' must be an object of the model's inputs.", param="input", code="missing_required_parameter"
            )
        webhook, events = await self._webhook(body)
        fields, files, recorded = await self._translate(inputs, base_url, principal)
        fields["model"] = name
        mode = "edit" if files else "text-to-image"
        return mode, fields, files, recorded, version, webhook, events

    async def get(
        self, rid: str, base_url: str, wait: float | None = None, principal: Principal = OPEN
    ) -> dict[str, Any]:
        await self._owned(rid, principal)
        if wait:
            await self.gw.images.wait(rid, timeout=wait, cancel_on_abandon=False)
        record = await self.gw.db.get_request(rid)
        if record is None:
            raise not_found(f"No prediction '{rid}'.", code="prediction_not_found")
        return self.render(record, base_url)

    async def cancel(self, rid: str, base_url: str, principal: Principal = OPEN) -> dict[str, Any]:
        await self._owned(rid, principal)
        record = await self.gw.images.cancel(rid)
        if record is None:
            raise not_found(f"No prediction '{rid}'.", code="prediction_not_found")
        return self.render(record, base_url)

    async def _owned(self, rid: str, principal: Principal) -> None:
        """A key sees its own predictions (an admin key, every one): others' are not found, not forbidden."""
        if principal.sees_all():
            return
        if not principal.owns(await self.gw.db.get_request(rid)):
            raise not_found(f"No prediction '{rid}'.", code="prediction_not_found")

    async def list(
        self, base_url: str, cursor: str | None, limit: int = 100, principal: Principal = OPEN
    ) -> dict[str, Any]:
        before = _decode_cursor(cursor) if cursor else None
        key_id = None if principal.sees_all() else principal.key_id
        records = await self.gw.db.list_requests(limit=limit + 1, before=before, key_id=key_id)
        page, more = records[:limit], len(records) > limit
        nxt = None
        if more:
            last = page[-1]
            nxt = f"{base_url.rstrip('/')}/v1/predictions?cursor={_encode_cursor(last['created_at'], last['id'])}" + (
                f"&limit={limit}" if limit != 100 else ""
            )
        return {"previous": None, "next": nxt, "results": [self.render(r, base_url) for r in page]}

    def render(self, record: dict[str, Any], base_url: str) -> dict[str, Any]:
        """The prediction object, as Replicate's API returns it."""
        base = base_url.rstrip("/")
        rid = record["id"]
        output: Any = None
        if record["status"] == "succeeded":
            urls = [self.gw.images.blob_url(base_url, b) for b in record["output_blob_ids"]]
            output = urls[0] if len(urls) == 1 else urls  # Kontext returns one URI; n > 1 a list
        error = record.get("error") or None
        started, completed = record.get("started_at"), record.get("completed_at")
        metrics: dict[str, Any] = {}
        if started and completed:
            metrics["predict_time"] = round((completed - started).total_seconds(), 3)
        if completed:
            metrics["total_time"] = round((completed - record["created_at"]).total_seconds(), 3)
        if record["status"] == "succeeded":
            metrics["image_count"] = len(record["output_blob_ids"])
        return {
            "id": rid,
            "model": (record.get("params") or {}).get("requested_model") or record["model"],
            "version": record.get("version") or "kontext-gateway",
            "input": record.get("input") or {},
            # While the local engine in this process runs it, the step counter too (as cog prints one).
            "logs": (record.get("logs") or "")
            + (f"denoising step {steps[0]}/{steps[1]}\n" if (steps := self.gw.runner.steps.get(rid)) else ""),
            "output": output,
            "data_removed": record.get("purged_at") is not None,  # payloads purged (history)
            "error": error.get("message") if isinstance(error, dict) else error,
            "status": record["status"],
            "source": "api" if record.get("endpoint") == "predictions" else "web",
            "created_at": _iso(record["created_at"]),
            "started_at": _iso(started),
            "completed_at": _iso(completed),
            "urls": {"get": f"{base}/v1/predictions/{rid}", "cancel": f"{base}/v1/predictions/{rid}/cancel"},
            "metrics": metrics,
            # Not Replicate's: denoising steps done, while the local engine in this process runs it.
            **({"progress": {"step": steps[0], "total": steps[1]}} if steps else {}),
        }

    # -- input -----------------------------------------------------------------------------------------

    async def _webhook(self, body: dict[str, Any]) -> tuple[str | None, list[str] | None]:
        webhook = body.get("webhook")
        events = body.get("webhook_events_filter")
        if webhook is None:
            return None, None
        if not isinstance(webhook, str):
            raise GatewayError("'webhook' must be a URL.", status=422, param="webhook", code="invalid_url")
        from .jobs.webhooks import validate_webhook_url

        await validate_webhook_url(webhook, self.gw.settings)
        if events is not None and (not isinstance(events, list) or any(e not in EVENTS for e in events)):
            raise GatewayError(
                f"'webhook_events_filter' takes a list of {', '.join(EVENTS)}.",
                status=422,
                param="webhook_events_filter",
                code="invalid_value",
            )
        return webhook, events

    async def _translate(
        self, inputs: dict[str, Any], base_url: str, principal: Principal = OPEN
    ) -> tuple[dict[str, Any], list[InputFile], dict[str, Any]]:
        """Replicate input -> (unified fields, image files, the input as recorded: images by reference)."""
        fields: dict[str, Any] = {}
        sources: list[tuple[str, Any]] = []
        numbered = sorted(
            (k for k in inputs if k.startswith("input_image_") and k[12:].isdigit()), key=lambda k: int(k[12:])
        )
        for key, value in inputs.items():
            if key in SINGLE_IMAGE_KEYS or key in numbered:
                continue
            if key in LIST_IMAGE_KEYS:
                continue
            if key == "aspect_ratio" and value == "match_input_image":
                continue  # the default for an edit: keep the input's shape
            fields[RENAMES.get(key, key)] = value
        for key in (*SINGLE_IMAGE_KEYS, *numbered):
            if inputs.get(key) is not None:
                sources.append((key, inputs[key]))
        for key in LIST_IMAGE_KEYS:
            value = inputs.get(key)
            if value is None:
                continue
            if not isinstance(value, list):
                raise invalid(f"'{key}' must be a list of image URLs.", param=f"input.{key}", code="invalid_type")
            for i, item in enumerate(value):
                url = item.get("image_url") if isinstance(item, dict) else item
                sources.append((f"{key}[{i}]", url))
        files = [InputFile(await self._image(value, f"input.{key}", base_url, principal)) for key, value in sources]
        recorded = {k: (_summary(v) if isinstance(v, str) and v.startswith("data:") else v) for k, v in inputs.items()}
        return fields, files, recorded

    async def _image(self, value: Any, param: str, base_url: str, principal: Principal = OPEN) -> bytes:
        if not isinstance(value, str) or not value:
            raise invalid(f"'{param}' must be an image URL or a data URI.", param=param, code="invalid_image_url")
        if value.startswith("data:"):
            return parse_data_url(value, param=param)
        try:
            parts = urlsplit(value)
        except ValueError:  # e.g. an unclosed IPv6 literal, "http://[::1/"
            raise invalid(f"'{param}' is not a valid URL.", param=param, code="invalid_image_url") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise invalid(f"'{param}' must be an http(s) URL or a data URI.", param=param, code="invalid_image_url")
        own = await self._own(parts, base_url, principal)
        if own is not None:
            return own
        return await self._fetch(value, param)

    async def _own(self, parts: Any, base_url: str, principal: Principal = OPEN) -> bytes | None:
        """A URL of this gateway (an uploaded file of the caller's, a stored image): read from the store."""
        ours = {urlsplit(base_url).netloc}
        if self.gw.settings.public_url:
            ours.add(urlsplit(self.gw.settings.public_url).netloc)
        if parts.netloc not in ours:
            return None
        path = parts.path
        if path.startswith(FILES_ROUTE):
            record = await self.gw.db.get_file(path[len(FILES_ROUTE) :].removesuffix("/download"))
            record = record if principal.owns(record) else None
            data = self.gw.blobs.get(record["blob_id"]) if record else None
            if data is not None:
                return data
        if path.startswith(BLOB_ROUTE):
            data = self.gw.images.signed_blob(path, parts.query)
            if data is not None:
                return data
        raise invalid(
            "That URL of this gateway names no stored file (or its link has expired).",
            param="input",
            code="invalid_image_url",
        )

    async def _fetch(self, url: str, param: str) -> bytes:
        """Someone else's URL: checked, pinned to the checked address, size- and time-limited (net.py)."""
        from .net import fetch_image

        settings = self.gw.settings
        return await fetch_image(
            url,
            param=param,
            allow_private=settings.allow_private_urls,
            max_bytes=settings.max_file_bytes,
            deadline_s=settings.fetch_timeout_s,
        )


def _summary(data_uri: str) -> str:
    head = data_uri.split(",", 1)[0]
    return f"{head},... ({len(data_uri)} characters)"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _encode_cursor(at: datetime, rid: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([at.isoformat(), rid]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    """A cursor is ours: base64 of a short JSON pair. Anything else (longer, nested, not a pair of
    strings) is refused before it costs anything."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError(cursor)
        at, rid = safejson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)), max_depth=1)
        if not isinstance(at, str) or not isinstance(rid, str):
            raise ValueError(cursor)
        return datetime.fromisoformat(at), rid
    except (ValueError, TypeError, GatewayError):
        raise invalid(
            "Invalid 'cursor': use the 'next' URL of the previous page.", param="cursor", code="invalid_cursor"
        ) from None
