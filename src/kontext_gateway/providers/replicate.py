"""Replicate: FLUX.1 Kontext [pro] / [max] / [dev] through the predictions API.

Create `POST /v1/models/{owner}/{name}/predictions` with `Prefer: wait=N` (a fast model answers with
the finished prediction), else poll `urls.get` until a terminal status; `urls.cancel` stops it. Output
is one URI. Two input images go to the `flux-kontext-apps/multi-image-kontext-{pro,max}` apps. Moderation
has no status of its own: a `failed` prediction whose error says so (moderation.py lists the wordings).

Input images: Replicate takes a data URL for small files only (256 KB in its API reference); larger
ones go through its files API (`POST /v1/files`) and are sent by the file's URL.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..catalog import ProviderEntry
from .base import ImageJob, Refusal
from .bfl import as_int
from .calls import Answer, Call, Done, Encoded, Pending, Polled, Task
from .dialect import Dialect, Submission, json_object
from .errors import Malformed, Moderated, ServerError, TaskFailed
from .moderation import flagged
from .routes import Route, route

# Short sync wait: a quick model saves the polls, yet an abandoned request is not left blind (no task
# id to cancel) for long while the create call is held open.
PREFER_WAIT_S = 5
IMAGE_SAFETY_CAP = 2  # "2 is currently the maximum allowed when input images are used"


class Replicate(Dialect):
    name = "replicate"
    credential_field = "replicate_api_token"
    base_url_field = "replicate_base_url"
    credential_env = "REPLICATE_API_TOKEN"
    credential_hosts = ("api.replicate.com",)  # where urls.get / urls.cancel and the files API live
    inline_limit = 256 * 1024  # a data URL of at most 256 KB; larger inputs go through the files API
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        "prompt": {"handling": "native", "as": "input.prompt"},
        "image": {
            "handling": "renamed",
            "as": "input.input_image (data URL up to 256 KB, else a Replicate file URL); two images: "
            "flux-kontext-apps/multi-image-kontext-{pro,max} input_image_1, input_image_2",
        },
        "seed": {"handling": "native", "as": "input.seed"},
        "size": {"handling": "converted", "as": "input.aspect_ratio (nearest of the enum)"},
        "aspect_ratio": {
            "handling": "converted",
            "as": "input.aspect_ratio (nearest of the enum; match_input_image for an edit)",
        },
        "n": {"handling": "emulated", "as": "one prediction per image, in parallel"},
        "output_format": {
            "handling": "converted",
            "as": "input.output_format (jpeg -> jpg; other formats made as png and converted by the gateway)",
        },
        "output_compression": {"handling": "emulated", "as": "gateway"},
        "response_format": {"handling": "emulated", "as": "gateway"},
    }
    DEV_HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        **HANDLING,
        "image": {"handling": "renamed", "as": "input.input_image (data URL up to 256 KB, else a file URL; one)"},
        "output_format": {
            "handling": "converted",
            "as": "input.output_format (jpeg -> jpg, webp, png; others made as png and converted by the gateway)",
        },
        "output_compression": {"handling": "renamed", "as": "input.output_quality (0-100)"},
        "cfg_scale": {"handling": "renamed", "as": "input.guidance (0-10)"},
        "num_inference_steps": {"handling": "renamed", "as": "input.num_inference_steps (4-50)"},
    }

    def handling(self, entry: ProviderEntry) -> dict[str, dict[str, str]]:
        return dict(self.DEV_HANDLING if _is_dev(entry) else self.HANDLING)

    def credentials(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> Refusal | None:
        if _is_dev(entry) and not job.images:
            return Refusal("black-forest-labs/flux-kontext-dev on Replicate only edits (input_image is required)")
        return super().unsupported(entry, job)

    def route(self, entry: ProviderEntry, job: ImageJob) -> Route:
        if len(job.images) == 2 and not _is_dev(entry):  # the official pro/max take one image; the apps two
            variant = entry.provider_model_id.rsplit("-", 1)[-1]  # "pro" or "max"
            return route(
                "replicate",
                f"flux-kontext-apps/multi-image-kontext-{variant}",
                same_as="flux-kontext-apps/multi-image-kontext-pro",
            )
        return route("replicate", entry.provider_model_id)

    # -- calls ------------------------------------------------------------------------------------------

    def submit(self, entry: ProviderEntry, job: ImageJob, count: int, images: list[str]) -> Submission:
        target = self.route(entry, job)
        inputs = self.passthrough(job, target)  # first, so the mapped fields below win
        adjusted: dict[str, str] = {}
        sources: dict[str, str] = {}
        if "safety_tolerance" in inputs:
            inputs["safety_tolerance"] = as_int(inputs["safety_tolerance"])
            level = inputs["safety_tolerance"]
            if images and isinstance(level, int) and not isinstance(level, bool) and level > IMAGE_SAFETY_CAP:
                inputs["safety_tolerance"] = IMAGE_SAFETY_CAP
                adjusted["safety_tolerance"] = (
                    f"sent {IMAGE_SAFETY_CAP}: Replicate allows at most 2 with an input image"
                )
        inputs.update(prompt=job.prompt, seed=job.seed, aspect_ratio=self._ratio(job, target))
        inputs["output_format"] = _replicate_format(self.upstream_format(job, target))
        consumed: list[str] = []
        if _is_dev(entry):
            # The catalog's defaults when unset, so the schema's advertised defaults hold.
            steps = job.steps or job.model.default_steps
            guidance = job.guidance if job.guidance is not None else job.model.default_guidance
            if steps is not None:
                inputs["num_inference_steps"] = steps
            if guidance is not None:
                inputs["guidance"] = guidance
            if job.output_compression is not None:
                inputs["output_quality"] = job.output_compression
            sources = {"guidance": "cfg_scale", "output_quality": "output_compression"}
            consumed = ["cfg_scale", "num_inference_steps"]
        if len(images) == 2 and "input_image_1" in target.fields:
            inputs.update(input_image_1=images[0], input_image_2=images[1])
        elif images:
            inputs["input_image"] = images[0]
        call = Call(
            "POST",
            f"{self.base_url}/v1/models/{target.id}/predictions",
            json={"input": inputs},
            headers={"Prefer": f"wait={PREFER_WAIT_S}"},
        )
        return Submission(
            call,
            count,
            target,
            sources=sources,
            ignored=self.ignored(job, inputs, tuple(consumed)),
            adjusted=adjusted,
        )

    def upload(self, encoded: Encoded) -> Call:
        name = f"input.{encoded.format}"
        return Call(
            "POST",
            f"{self.base_url}/v1/files",
            files={"content": (name, encoded.data, encoded.mime)},
            data={"filename": name, "type": encoded.mime},
        )

    def uploaded(self, answer: Answer, encoded: Encoded) -> tuple[str, Call | None]:
        urls = json_object(answer, "Replicate's file").get("urls")
        url = urls.get("get") if isinstance(urls, dict) else None
        if not isinstance(url, str) or not url:
            raise Malformed("Replicate's file answer has no urls.get", status=answer.status)
        return url, None

    def poll(self, entry: ProviderEntry, task: Task) -> Call:
        return Call("GET", task.data["get"])

    def cancel(self, entry: ProviderEntry, task: Task) -> Call | None:
        return Call("POST", task.data["cancel"]) if task.data.get("cancel") else None

    # -- answers --------------------------------------------------------------------------------------

    def submitted(self, entry: ProviderEntry, answer: Answer, count: int) -> Task:
        prediction = json_object(answer, "the created prediction")
        urls = prediction.get("urls")
        if not isinstance(prediction.get("id"), str) or not isinstance(urls, dict) or not urls.get("get"):
            raise Malformed("the created prediction has no id or urls.get", status=answer.status)
        # Replicate's own URLs: they are where this prediction lives.
        task = Task(id=prediction["id"], data={"get": urls["get"], "cancel": urls.get("cancel")})
        state = outcome(prediction)
        if isinstance(state, Done):
            task.outputs = state.outputs
        return task

    def polled(self, entry: ProviderEntry, task: Task, answer: Answer) -> Polled:
        return outcome(json_object(answer, f"prediction {task.id}"))

    def _ratio(self, job: ImageJob, target: Route) -> str:
        if self.keeps_input_shape(job):
            return "match_input_image"
        enum = tuple(r for r in target.fields.get("aspect_ratio", {}).get("enum", ()) if r != "match_input_image")
        return self.aspect_ratio(job, enum) or "1:1"


def outcome(prediction: dict[str, Any]) -> Polled:
    """A prediction's state; raises for the terminal failures."""
    status = prediction.get("status")
    pid = prediction.get("id")
    if status == "succeeded":
        output = prediction.get("output")
        outputs = [output] if isinstance(output, str) else output  # one URI; a list is accepted too
        if not isinstance(outputs, list) or not outputs or not all(isinstance(u, str) for u in outputs):
            raise Malformed(f"prediction {pid} succeeded without an output URI")
        return Done(outputs)
    if status == "failed":
        error = str(prediction.get("error") or "no error given")[:300]
        if (signal := flagged("replicate", "error", error)) is not None:
            raise Moderated(f"{error} ({signal.means})")
        raise TaskFailed(f"prediction {pid} failed: {error}")
    if status == "aborted":  # its deadline passed before it started: nothing ran, nothing was billed
        raise ServerError(f"prediction {pid} was aborted before it started")
    if status == "canceled":
        raise TaskFailed(f"prediction {pid} was canceled")
    if isinstance(status, str) and status:
        return Pending()  # starting, processing
    raise Malformed(f"prediction {pid} has no status")


def _is_dev(entry: ProviderEntry) -> bool:
    return entry.provider_model_id.endswith("-dev")


def _replicate_format(fmt: str) -> str:
    return "jpg" if fmt == "jpeg" else fmt  # Replicate spells it jpg and refuses "jpeg"
