"""Black Forest Labs' own API (https://docs.bfl.ai): FLUX.1 Kontext [pro] and [max].

Submit `POST {base}/v1/flux-kontext-pro|max` with `x-key`, then poll the returned `polling_url`, and
only that (it names the cluster that took the task; another cluster answers `Task not found`), with
`x-key` too (polling URLs name `api.<cluster>.bfl.ai`, e.g. api.us1.bfl.ai: the key goes there and
nowhere else). `Ready` gives `result.sample`, a signed URL valid for 10 minutes. One image per task;
at most 24 active tasks per account, 6 of them for kontext-max. There is no cancel.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

from ..catalog import ProviderEntry
from .base import ImageJob
from .remote import Malformed, Moderated, Poll, RemoteProvider, Task, TaskFailed, safety_tolerance

# The 11 Kontext ratios, all within the API's 21:9 .. 9:21.
RATIOS = ("21:9", "16:9", "4:3", "3:2", "5:4", "1:1", "4:5", "2:3", "3:4", "9:16", "9:21")
PENDING = ("Pending", "Reasoning", "Generating")  # the last two are newer progress states
MODERATED = ("Request Moderated", "Content Moderated")
FAILED = ("Error", "Task not found")
KNOWN = (*PENDING, "Ready", *MODERATED, *FAILED)


class BFLProvider(RemoteProvider):
    name = "bfl"
    credential_field = "bfl_api_key"
    base_url_field = "bfl_base_url"
    credential_env = "BFL_API_KEY"
    batch_limit = 1
    default_concurrency = 24  # active tasks per account
    model_concurrency: ClassVar[dict[str, int]] = {"flux-kontext-max": 6}
    output_formats = ("png", "jpeg")
    # The documented API hosts: global api.bfl.ai, and the clusters a polling_url names (api.eu.bfl.ai,
    # api.us1.bfl.ai...). Not "*.bfl.ai": delivery.*.bfl.ai and the rest have no use for the key.
    credential_hosts = ("api.bfl.ai", "api.*.bfl.ai")
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        "prompt": {"handling": "native", "as": "prompt"},
        "seed": {"handling": "native", "as": "seed"},
        "size": {
            "handling": "converted",
            "as": "aspect_ratio 'W:H' (nearest Kontext ratio; left out on an edit to keep the input's)",
        },
        "aspect_ratio": {"handling": "converted", "as": "aspect_ratio 'W:H' (nearest Kontext ratio)"},
        "image": {"handling": "renamed", "as": "input_image, input_image_2..4 (bare base64)"},
        "n": {"handling": "emulated", "as": "one task per image, in parallel"},
        "response_format": {"handling": "emulated", "as": "gateway"},
        "output_format": {
            "handling": "native",
            "as": "output_format (jpeg, png; other formats made as png and converted by the gateway)",
        },
        "output_compression": {"handling": "emulated", "as": "gateway"},
    }

    def headers(self) -> dict[str, str]:
        return {"x-key": self._key or ""}

    async def submit(self, entry: ProviderEntry, job: ImageJob, count: int) -> Task:
        body = dict(self.passthrough(job))  # prompt_upsampling, webhook fields, unknown ones
        if "safety_tolerance" in body:
            body["safety_tolerance"] = safety_tolerance(body["safety_tolerance"], has_image=False)  # no cap on BFL
        body.update(prompt=job.prompt, seed=job.seed, output_format=self.upstream_format(job))
        images = await self.input_base64(job)  # bare base64: no data: prefix
        for i, b64 in enumerate(images):
            body["input_image" if i == 0 else f"input_image_{i + 1}"] = b64
        # Left out on an edit with no size asked, so the output keeps the input's ratio.
        ratio = self.aspect_ratio(job, RATIOS) or (None if images else "1:1")
        if ratio is not None:
            body["aspect_ratio"] = ratio
        url = f"{self.base_url}/v1/{entry.provider_model_id}"
        resp = await self.request("POST", url, json=body)
        data = self.json(resp)
        if not data.get("id") or not isinstance(data.get("polling_url"), str):
            raise Malformed("BFL's submit response lacks id or polling_url", status=resp.status_code)
        return Task(id=str(data["id"]), data={"polling_url": data["polling_url"]})

    async def poll(self, entry: ProviderEntry, task: Task) -> Poll:
        resp = await self.request("GET", task.data["polling_url"])
        body = self.json(resp)
        status = body.get("status")
        if status in PENDING:
            return Poll(done=False)
        if status == "Ready":
            result = body.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str) or not sample:
                raise Malformed("BFL task is Ready without result.sample", status=resp.status_code)
            return Poll(done=True, outputs=[sample])
        raw_details = body.get("details")
        details = raw_details if isinstance(raw_details, dict) else {}
        if status in MODERATED:
            reasons = details.get("Moderation Reasons") or []
            why = ", ".join(map(str, reasons)) if isinstance(reasons, list) else str(reasons)
            raise Moderated(f"{status}" + (f" ({why[:200]})" if why else ""), status=resp.status_code)
        if status in FAILED:
            raise TaskFailed(
                f"BFL task {task.id}: {status}" + (f" ({str(details)[:200]})" if details else ""),
                status=resp.status_code,
            )
        raise Malformed(f"BFL status {str(status)[:40]!r} is not one the gateway knows", status=resp.status_code)

    def check_status(self, resp: httpx.Response) -> None:
        # A poll's body status is authoritative: a moderated or lost task may come with a 404 or 503.
        if resp.status_code not in (401, 402, 403, 429) and _body_status(resp) in KNOWN:
            return
        super().check_status(resp)


def _body_status(resp: httpx.Response) -> Any:
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None
