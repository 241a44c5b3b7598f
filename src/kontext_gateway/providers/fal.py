"""fal.ai through its queue API (https://docs.fal.ai/model-endpoints/queue).

Submit `POST {queue}/{route}`, then poll the returned `status_url` until COMPLETED and fetch the
returned `response_url` (both live at the app root, without the route's subpath, so they are never
rebuilt); `PUT cancel_url` stops a task nobody waits for. Auth: `Authorization: Key <FAL_KEY>`.

The route follows from the catalog's provider model id: `.../kontext[/max]/text-to-image` for
text-to-image, the same without `/text-to-image` for a one-image edit, and `/multi` after that for
several images (`image_urls`). `fal-ai/flux-kontext/dev` (and `-lora`) edit exactly one image. fal
makes up to 4 images per request (`num_images`), so `n` needs one request per 4 images.

Moderation: pro/max answer 422 with a `content_policy_violation` entry in `detail` (and fal may bill
a 422: the catalog says so); [dev] flags outputs in `has_nsfw_concepts`. Input images go inline as data
URIs up to 1 MiB (fal documents no limit, only that URLs work everywhere); larger ones are uploaded
to fal's storage first (`POST {storage}/storage/upload/initiate`, then `PUT` the bytes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ..catalog import ProviderEntry
from ..config import Settings
from .base import ImageJob, Refusal
from .calls import Answer, Call, Done, Encoded, Fetch, Pending, Polled, Task
from .dialect import Dialect, Submission, json_object, typed
from .errors import Malformed, Moderated, TaskFailed, UpstreamError
from .moderation import flagged, flags
from .routes import Route, route

T2I = "/text-to-image"
COMPLETED = "COMPLETED"
FAILED = ("FAILED", "CANCELED", "CANCELLED")  # not in fal's docs; a third-party schema lists them
SAFETY_LEVELS = ("1", "2", "3", "4", "5", "6")  # fal's safety_tolerance: a string, 1 the strictest


class Fal(Dialect):
    name = "fal"
    credential_field = "fal_key"
    base_url_field = "fal_base_url"
    credential_env = "FAL_KEY"
    # Where the returned status/response/cancel URLs live, and the storage API inputs are uploaded to.
    credential_hosts = ("queue.fal.run", "rest.fal.ai")
    batch_limit = 4  # num_images is 1-4
    inline_limit = 1024 * 1024
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {  # pro / max
        "prompt": {"handling": "native", "as": "prompt"},
        "seed": {"handling": "native", "as": "seed"},
        "size": {
            "handling": "converted",
            "as": "aspect_ratio (nearest of 9 ratios; left out on an edit to keep the input's)",
        },
        "aspect_ratio": {"handling": "converted", "as": "aspect_ratio (nearest of 9 ratios)"},
        "image": {
            "handling": "renamed",
            "as": "image_url (data URI up to 1 MiB, else a fal storage URL); image_urls on the /multi route",
        },
        "n": {"handling": "renamed", "as": "num_images (1-4 per request; more are split across requests)"},
        "response_format": {"handling": "emulated", "as": "gateway"},
        "output_format": {
            "handling": "native",
            "as": "output_format (jpeg, png; other formats made as png and converted by the gateway)",
        },
        "output_compression": {"handling": "emulated", "as": "gateway"},
        "cfg_scale": {"handling": "renamed", "as": "guidance_scale (1-20)"},
    }
    DEV_HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        **HANDLING,
        "size": {"handling": "converted", "as": "resolution_mode (nearest ratio; match_input when none asked)"},
        "aspect_ratio": {"handling": "converted", "as": "resolution_mode (nearest ratio)"},
        "image": {"handling": "renamed", "as": "image_url (data URI up to 1 MiB, else a fal storage URL; one)"},
        "cfg_scale": {"handling": "renamed", "as": "guidance_scale"},
        "num_inference_steps": {"handling": "native", "as": "num_inference_steps"},
    }

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.storage_url = settings.fal_storage_url.rstrip("/")

    def configured_urls(self) -> list[str]:
        return [self.base_url, self.storage_url]

    def credentials(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Key {key}"}

    def handling(self, entry: ProviderEntry) -> dict[str, dict[str, str]]:
        if takes_loras(entry):
            table = {**self.DEV_HANDLING, "loras": {"handling": "native", "as": "loras"}}
            table["num_inference_steps"] = {"handling": "native", "as": "num_inference_steps (10-50)"}
            table["cfg_scale"] = {"handling": "renamed", "as": "guidance_scale (0-20)"}
            return table
        return dict(self.DEV_HANDLING if is_dev(entry) else self.HANDLING)

    def route(self, entry: ProviderEntry, job: ImageJob) -> Route:
        if is_dev(entry):
            return route("fal", entry.provider_model_id)
        edit = entry.provider_model_id.removesuffix(T2I)
        if not job.images:
            return route("fal", edit + T2I)
        return route("fal", edit if len(job.images) == 1 else edit + "/multi")

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> Refusal | None:
        if is_dev(entry) and len(job.images) != 1:
            return Refusal(f"{entry.provider_model_id} on fal edits exactly one image (image_url is required)")
        if job.loras and takes_loras(entry):  # fal's kontext-lora route takes them as they are
            return super().unsupported(entry, dataclasses.replace(job, loras=[]))
        return super().unsupported(entry, job)

    # -- calls ------------------------------------------------------------------------------------------

    def submit(self, entry: ProviderEntry, job: ImageJob, count: int, images: list[str]) -> Submission:
        target = self.route(entry, job)
        body = self.passthrough(job, target)  # extra parameters first: the mapped fields below win
        adjusted: dict[str, str] = {}
        consumed: list[str] = []
        sources = {"guidance_scale": "cfg_scale"}
        if "prompt_upsampling" in job.extra and target.has("enhance_prompt") and "enhance_prompt" not in body:
            body["enhance_prompt"] = typed(job.extra["prompt_upsampling"], "boolean")  # fal's name for it
            sources["enhance_prompt"] = "prompt_upsampling"
            consumed.append("prompt_upsampling")
        if "safety_tolerance" in body:
            body["safety_tolerance"], why = _tolerance(body["safety_tolerance"])
            if why:
                adjusted["safety_tolerance"] = why
        body.update(prompt=job.prompt, seed=job.seed, num_images=count, output_format=self.upstream_format(job, target))
        if job.guidance is not None and target.has("guidance_scale"):
            body["guidance_scale"] = job.guidance
            consumed.append("cfg_scale")
        if job.steps is not None and target.has("num_inference_steps"):
            body["num_inference_steps"] = job.steps
            consumed.append("num_inference_steps")
        if job.loras and target.has("loras"):
            body["loras"] = [{"path": lora["path"], "scale": lora.get("scale", 1.0)} for lora in job.loras]
        if target.has("resolution_mode"):  # [dev]: the shape by resolution_mode, match_input by default
            ratio = self.aspect_ratio(job, _ratios(target, "resolution_mode"))
            if ratio is not None:
                body.setdefault("resolution_mode", ratio)
        elif not self.keeps_input_shape(job):  # left out on an edit, so the output keeps the input's shape
            body["aspect_ratio"] = self.aspect_ratio(job, _ratios(target, "aspect_ratio")) or "1:1"
        if target.has("image_urls"):
            body["image_urls"] = images
        elif images:
            body["image_url"] = images[0]
        return Submission(
            Call("POST", f"{self.base_url}/{target.id}", json=body),
            count,
            target,
            sources=sources,
            ignored=self.ignored(job, body, tuple(consumed)),
            adjusted=adjusted,
        )

    def upload(self, encoded: Encoded) -> Call:
        return Call(
            "POST",
            f"{self.storage_url}/storage/upload/initiate?storage_type=fal-cdn-v3",
            json={"content_type": encoded.mime, "file_name": f"input.{encoded.format}"},
        )

    def uploaded(self, answer: Answer, encoded: Encoded) -> tuple[str, Call | None]:
        data = json_object(answer, "fal's upload answer")
        upload_url, file_url = data.get("upload_url"), data.get("file_url")
        if not isinstance(upload_url, str) or not isinstance(file_url, str) or not upload_url or not file_url:
            raise Malformed("fal's upload answer lacks upload_url or file_url", status=answer.status)
        # A signed URL of fal's storage: the bytes go there without the key.
        put = Call("PUT", upload_url, content=encoded.data, headers={"content-type": encoded.mime}, credentials=False)
        return file_url, put

    def poll(self, entry: ProviderEntry, task: Task) -> Call:
        return Call("GET", task.data["status_url"])

    def cancel(self, entry: ProviderEntry, task: Task) -> Call | None:
        return Call("PUT", task.data["cancel_url"])

    # -- answers --------------------------------------------------------------------------------------

    def submitted(self, entry: ProviderEntry, answer: Answer, count: int) -> Task:
        data = json_object(answer, "fal's submit answer")
        urls = {k: data.get(k) for k in ("status_url", "response_url", "cancel_url")}
        if not data.get("request_id") or not all(isinstance(u, str) and u for u in urls.values()):
            raise Malformed(
                "fal's submit answer lacks request_id or its status/response/cancel URLs", status=answer.status
            )
        return Task(id=str(data["request_id"]), data={**urls, "count": count})

    def polled(self, entry: ProviderEntry, task: Task, answer: Answer) -> Polled:
        state = json_object(answer, f"fal request {task.id}").get("status")
        if state == COMPLETED:
            # Terminal for failures too: the response URL answers with the error's status.
            return Fetch(Call("GET", task.data["response_url"]))
        if state in FAILED:
            raise TaskFailed(f"fal request {task.id} ended {state}")
        if isinstance(state, str) and state:
            return Pending()  # IN_QUEUE, IN_PROGRESS
        raise Malformed(f"fal request {task.id}: the status answer has no status", status=answer.status)

    def fetched(self, entry: ProviderEntry, task: Task, answer: Answer) -> Done:
        result = json_object(answer, f"fal request {task.id}'s result")
        for flag in flags(self.name):
            if any(result.get(flag) or []):
                raise Moderated(f"fal's safety checker flagged an output ({flag})")
        images = result.get("images")
        urls = [im.get("url") for im in images if isinstance(im, dict)] if isinstance(images, list) else []
        if len(urls) < task.data["count"] or not all(isinstance(u, str) and u for u in urls):
            raise Malformed(f"fal returned {len(urls)} usable image URL(s) for {task.data['count']} asked")
        return Done([str(u) for u in urls])

    def classify(self, answer: Answer, call: Call) -> UpstreamError | None:
        # Moderation is a 422 like a validation error; only detail[].type tells them apart.
        if answer.status == 422:
            detail = answer.object().get("detail")
            for item in detail if isinstance(detail, list) else []:
                kind = item.get("type") if isinstance(item, dict) else None
                if (signal := flagged(self.name, "error_type", kind)) is not None:
                    message = str(item.get("msg") or kind)[:300]
                    return Moderated(f"{message} ({signal.means})", status=422)
        return super().classify(answer, call)


def is_dev(entry: ProviderEntry) -> bool:
    return entry.provider_model_id.startswith("fal-ai/flux-kontext")


def takes_loras(entry: ProviderEntry) -> bool:
    return entry.provider_model_id.startswith("fal-ai/flux-kontext-lora")


def _ratios(target: Route, field: str) -> tuple[str, ...]:
    return tuple(r for r in target.fields.get(field, {}).get("enum", ()) if ":" in r)


def _tolerance(value: Any) -> tuple[Any, str | None]:
    """fal's string "1"-"6" for a level given as BFL's int 0-6 (or its string): (what to send, why it
    differs from what was asked, or None). 0, stricter than fal goes, is sent as "1". Anything else
    as it is, for the schema check to name."""
    try:
        level = int(str(value).strip())
    except ValueError:
        return value, None
    if level == 0:
        return "1", 'sent "1": fal\'s strictest level'
    return (str(level) if str(level) in SAFETY_LEVELS else value), None
