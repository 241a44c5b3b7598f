"""fal.ai through its queue API (https://docs.fal.ai/model-endpoints/queue).

Submit `POST {queue}/{route}`, then poll the returned `status_url` until COMPLETED and fetch the
returned `response_url` (both live at the app root, without the route's subpath, so they are never
rebuilt); `PUT cancel_url` stops a task nobody waits for. Auth: `Authorization: Key <FAL_KEY>`.

The route follows from the catalog's provider model id: `.../kontext[/max]/text-to-image` for
text-to-image, the same without `/text-to-image` for a one-image edit, and `/multi` after that for
several images (`image_urls`). `fal-ai/flux-kontext/dev` edits exactly one image. fal makes up to 4
images per request (`num_images`), so `n` needs one request per 4 images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import httpx

from ..catalog import ProviderEntry
from .base import ImageJob
from .remote import Malformed, Moderated, Poll, RemoteProvider, Task, TaskFailed

T2I = "/text-to-image"
# pro/max `aspect_ratio` enum, and the ratios of [dev]'s `resolution_mode` enum (besides auto / match_input).
RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
DEV_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
PENDING = ("IN_QUEUE", "IN_PROGRESS")
FAILED = ("FAILED", "CANCELED", "CANCELLED")  # not in fal's docs; a third-party schema lists them


class FalProvider(RemoteProvider):
    name = "fal"
    credential_field = "fal_key"
    base_url_field = "fal_base_url"
    credential_env = "FAL_KEY"
    batch_limit = 4  # num_images is 1-4
    output_formats = ("png", "jpeg")
    credential_hosts = ("queue.fal.run",)  # where the returned status/response/cancel URLs live
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {  # pro / max
        "prompt": {"handling": "native", "as": "prompt"},
        "seed": {"handling": "native", "as": "seed"},
        "size": {
            "handling": "converted",
            "as": "aspect_ratio (nearest of 9 ratios; left out on an edit to keep the input's)",
        },
        "aspect_ratio": {"handling": "converted", "as": "aspect_ratio (nearest of 9 ratios)"},
        "image": {"handling": "renamed", "as": "image_url (data URI); image_urls on the /multi route for several"},
        "n": {"handling": "renamed", "as": "num_images (1-4 per request; more are split across requests)"},
        "response_format": {"handling": "emulated", "as": "gateway"},
        "output_format": {
            "handling": "native",
            "as": "output_format (jpeg, png; other formats made as png and converted by the gateway)",
        },
        "output_compression": {"handling": "emulated", "as": "gateway"},
        "cfg_scale": {"handling": "renamed", "as": "guidance_scale"},
    }
    DEV_HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        **HANDLING,
        "size": {"handling": "converted", "as": "resolution_mode (nearest ratio; match_input when none asked)"},
        "aspect_ratio": {"handling": "converted", "as": "resolution_mode (nearest ratio)"},
        "image": {"handling": "renamed", "as": "image_url (data URI; one image)"},
        "num_inference_steps": {"handling": "native", "as": "num_inference_steps"},
    }

    def handling(self, entry: ProviderEntry) -> dict[str, dict[str, str]]:
        if self.takes_loras(entry):
            return {**self.DEV_HANDLING, "loras": {"handling": "native", "as": "loras"}}
        return dict(self.DEV_HANDLING if self.is_dev(entry) else self.HANDLING)

    @staticmethod
    def takes_loras(entry: ProviderEntry) -> bool:
        return entry.provider_model_id.startswith("fal-ai/flux-kontext-lora")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self._key}"}

    @staticmethod
    def is_dev(entry: ProviderEntry) -> bool:
        return entry.provider_model_id.startswith("fal-ai/flux-kontext")

    @staticmethod
    def route(entry: ProviderEntry, job: ImageJob) -> str:
        edit = entry.provider_model_id.removesuffix(T2I)
        if not job.images:
            return edit + T2I
        return edit if len(job.images) == 1 else edit + "/multi"

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> str | None:
        if self.is_dev(entry) and len(job.images) != 1:
            return "fal's [dev] route edits exactly one image"
        if job.loras and self.takes_loras(entry):  # fal's kontext-lora route takes them as they are
            return super().unsupported(entry, dataclasses.replace(job, loras=[]))
        return super().unsupported(entry, job)

    def ignored_params(self, job: ImageJob) -> list[str]:
        return [p for p in super().ignored_params(job) if p != "prompt_upsampling"]  # sent as enhance_prompt

    async def body(self, entry: ProviderEntry, job: ImageJob, count: int) -> dict[str, Any]:
        body = dict(self.passthrough(job))  # extra parameters first: the mapped fields below win
        if "prompt_upsampling" in job.extra:  # the unified name; fal calls it enhance_prompt
            body.pop("prompt_upsampling", None)
            body.setdefault("enhance_prompt", job.extra["prompt_upsampling"])
        if "safety_tolerance" in body:
            body["safety_tolerance"] = _tolerance(body["safety_tolerance"])
        body.update(prompt=job.prompt, seed=job.seed, num_images=count, output_format=self.upstream_format(job))
        if job.guidance is not None:
            body["guidance_scale"] = job.guidance
        images = await self.input_data_uris(job)
        if self.is_dev(entry):
            body["image_url"] = images[0]
            if job.loras and self.takes_loras(entry):
                body["loras"] = [{"path": lora["path"], "scale": lora.get("scale", 1.0)} for lora in job.loras]
            if job.steps is not None:
                body["num_inference_steps"] = job.steps
            ratio = self.aspect_ratio(job, DEV_RATIOS)
            if ratio is not None:  # otherwise fal's default, match_input, keeps the input's shape
                body.setdefault("resolution_mode", ratio)
            return body
        if len(images) == 1:
            body["image_url"] = images[0]
        elif images:
            body["image_urls"] = images
        # Left out on an edit with no size asked, so the output keeps the input's ratio.
        ratio = self.aspect_ratio(job, RATIOS) or (None if images else "1:1")
        if ratio is not None:
            body["aspect_ratio"] = ratio
        return body

    async def submit(self, entry: ProviderEntry, job: ImageJob, count: int) -> Task:
        url = f"{self.base_url}/{self.route(entry, job)}"
        resp = await self.request("POST", url, json=await self.body(entry, job, count))
        data = self.json(resp)
        urls = {k: data.get(k) for k in ("status_url", "response_url", "cancel_url")}
        if not data.get("request_id") or not all(isinstance(u, str) and u for u in urls.values()):
            raise Malformed(
                "fal's submit response lacks request_id or its status/response/cancel URLs", status=resp.status_code
            )
        return Task(id=str(data["request_id"]), data={**urls, "count": count})

    async def poll(self, entry: ProviderEntry, task: Task) -> Poll:
        status = self.json(await self.request("GET", task.data["status_url"]))
        state = status.get("status")
        if state in PENDING:
            return Poll(done=False)
        if state in FAILED:
            raise TaskFailed(f"fal request {task.id} ended {state}")
        if state != "COMPLETED":
            raise Malformed(f"fal status {str(state)[:40]!r} is not one the gateway knows")
        # COMPLETED is terminal for failures too: the response URL answers with the error's status.
        result = self.json(await self.request("GET", task.data["response_url"]))
        if any(result.get("has_nsfw_concepts") or []):
            raise Moderated("fal's safety checker flagged the output (has_nsfw_concepts)")
        images = result.get("images")
        urls = [im.get("url") for im in images if isinstance(im, dict)] if isinstance(images, list) else []
        if len(urls) < task.data["count"] or not all(isinstance(u, str) and u for u in urls):
            raise Malformed(f"fal returned {len(urls)} usable image URL(s) for {task.data['count']} asked")
        return Poll(done=True, outputs=[str(u) for u in urls])

    async def cancel(self, entry: ProviderEntry, task: Task) -> None:
        await self.request("PUT", task.data["cancel_url"])

    def check_status(self, resp: httpx.Response) -> None:
        # Moderation is a 422 like a validation error; only detail[].type tells them apart.
        if resp.status_code == 422 and (msg := _policy_violation(resp)) is not None:
            raise Moderated(f"fal's content checker flagged the request: {msg}", status=422)
        super().check_status(resp)


def _tolerance(value: Any) -> Any:
    """fal wants a string "1"-"6"; an int (BFL's 0-6) is converted and clamped (0 -> "1")."""
    try:
        return str(min(6, max(1, int(value))))
    except (TypeError, ValueError):
        return value  # not a number: let fal say what is wrong with it


def _policy_violation(resp: httpx.Response) -> str | None:
    """The message of a `content_policy_violation` in a fal error body, or None."""
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        return None
    for item in detail if isinstance(detail, list) else []:
        if isinstance(item, dict) and item.get("type") == "content_policy_violation":
            return str(item.get("msg") or "content_policy_violation")[:300]
    return None
