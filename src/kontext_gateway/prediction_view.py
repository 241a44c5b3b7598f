"""The prediction object, as Replicate's API returns it: the one rendering of a job record, used by
the predictions API and by webhook deliveries alike."""

from __future__ import annotations

from typing import Any

from .jobs.channels import JobChannels
from .links import OwnLinks
from .store.records import JobStatus, RequestRow
from .timing import iso


class PredictionView:
    def __init__(self, links: OwnLinks, channels: JobChannels) -> None:
        self.links = links
        self.channels = channels

    def render(self, record: RequestRow, base_url: str) -> dict[str, Any]:
        base = base_url.rstrip("/")
        rid = record.id
        output: Any = None
        if record.status == JobStatus.SUCCEEDED:
            urls = [self.links.blob_url(base_url, b) for b in record.output_blob_ids]
            output = urls[0] if len(urls) == 1 else urls  # Kontext returns one URI; n > 1 a list
        started, completed = record.started_at, record.completed_at
        metrics: dict[str, Any] = {}
        if started and completed:
            metrics["predict_time"] = round((completed - started).total_seconds(), 3)
        if completed:
            metrics["total_time"] = round((completed - record.created_at).total_seconds(), 3)
        if record.status == JobStatus.SUCCEEDED:
            metrics["image_count"] = len(record.output_blob_ids)
        # While the local engine in this process runs it, the step counter too (as cog prints one).
        steps = self.channels.steps.get(rid)
        return {
            "id": rid,
            "model": (record.params or {}).get("requested_model") or record.model,
            "version": record.version or "kontext-gateway",
            "input": record.input or {},
            "logs": (record.logs or "") + (f"denoising step {steps[0]}/{steps[1]}\n" if steps else ""),
            "output": output,
            "data_removed": record.purged_at is not None,  # payloads purged (history)
            "error": record.error.get("message") if record.error else None,
            "status": record.status,
            "source": "api" if record.endpoint == "predictions" else "web",
            "created_at": iso(record.created_at),
            "started_at": iso(started),
            "completed_at": iso(completed),
            "urls": {"get": f"{base}/v1/predictions/{rid}", "cancel": f"{base}/v1/predictions/{rid}/cancel"},
            "metrics": metrics,
            # Not Replicate's: denoising steps done, while the local engine in this process runs it.
            **({"progress": {"step": steps[0], "total": steps[1]}} if steps else {}),
        }
