"""Fireworks AI: FLUX.1 Kontext [pro] / [max] through its workflows API (a copy of BFL's protocol).

Submit `POST /inference/v1/workflows/{model}` -> `{"request_id"}`; poll
`POST /inference/v1/workflows/{model}/get_result` with `{"id"}` until `Ready` (`result.sample` is the
image URL). One input image, no batch, no cancel.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..catalog import ProviderEntry
from .base import ImageJob
from .remote import Malformed, Moderated, Poll, RemoteProvider, Task, TaskFailed, safety_tolerance

# Kontext's 11 trained ratios, all inside the 21:9..9:21 range the API accepts.
RATIOS = ("21:9", "16:9", "4:3", "3:2", "5:4", "1:1", "4:5", "2:3", "3:4", "9:16", "9:21")
MODERATED = ("Request Moderated", "Content Moderated")  # the input / the output was flagged
FAILED = ("Error", "Failed", "Task not found")


class FireworksProvider(RemoteProvider):
    name = "fireworks"
    credential_field = "fireworks_api_key"
    base_url_field = "fireworks_base_url"
    credential_env = "FIREWORKS_API_KEY"
    batch_limit = 1  # no n upstream: the base fans out one task per image
    output_formats = ("png", "jpeg")
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        "prompt": {"handling": "native", "as": "prompt"},
        "image": {"handling": "renamed", "as": "input_image (data URI; one image)"},
        "seed": {"handling": "native", "as": "seed"},
        "size": {"handling": "converted", "as": "aspect_ratio W:H (nearest Kontext ratio)"},
        "aspect_ratio": {
            "handling": "converted",
            "as": "aspect_ratio W:H (nearest Kontext ratio; left out for an edit to keep the input's)",
        },
        "n": {"handling": "emulated", "as": "one task per image, in parallel"},
        "output_format": {"handling": "native", "as": "output_format (jpeg|png; others converted by the gateway)"},
        "output_compression": {"handling": "emulated", "as": "gateway"},
        "response_format": {"handling": "emulated", "as": "gateway"},
    }

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    def _url(self, entry: ProviderEntry) -> str:
        return f"{self.base_url}/inference/v1/workflows/{entry.provider_model_id}"

    async def submit(self, entry: ProviderEntry, job: ImageJob, count: int) -> Task:
        images = await self.input_data_uris(job)
        body: dict[str, Any] = {
            **self.passthrough(job),
            "prompt": job.prompt,
            "seed": job.seed,
            "output_format": self.upstream_format(job),
        }
        if images:
            body["input_image"] = images[0]
        if "safety_tolerance" in body:
            body["safety_tolerance"] = safety_tolerance(body["safety_tolerance"], has_image=bool(images))
        # An edit with no shape asked keeps the input's: leave aspect_ratio out (the API's default).
        keep_input = job.images and (job.size.size is None or (not job.size.exact and job.size.aspect_ratio is None))
        if not keep_input:
            body["aspect_ratio"] = self.aspect_ratio(job, RATIOS) or "1:1"
        resp = await self.request("POST", self._url(entry), json=body)
        request_id = self.json(resp).get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise Malformed("the submit answer has no request_id", status=resp.status_code)
        return Task(id=request_id)

    async def poll(self, entry: ProviderEntry, task: Task) -> Poll:
        # The docs' header says GET, but the examples and the Vercel SDK POST the id as JSON.
        resp = await self.request("POST", f"{self._url(entry)}/get_result", json={"id": task.id})
        body = self.json(resp)
        status = body.get("status")
        if status == "Ready":
            result = body.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str) or not sample:
                raise Malformed(f"task {task.id} is Ready without result.sample")
            return Poll(done=True, outputs=[sample])
        if status in MODERATED:
            raise Moderated(f"{status}{_reasons(body.get('details'))}")
        if status in FAILED:
            raise TaskFailed(f"task {task.id} ended {status!r}{_reasons(body.get('details'))}")
        if isinstance(status, str):
            return Poll(done=False)  # Pending, and any newer progress state (BFL adds Generating...)
        raise Malformed(f"task {task.id}: the answer has no status")


def _reasons(details: Any) -> str:
    """A short reason from `details` (moderation puts a list under "Moderation Reasons")."""
    if isinstance(details, dict) and isinstance(details.get("Moderation Reasons"), list):
        return ": " + ", ".join(str(r) for r in details["Moderation Reasons"])[:300]
    return f": {str(details)[:300]}" if details else ""
