"""Replicate: FLUX.1 Kontext [pro] / [max] / [dev] through the predictions API.

Create `POST /v1/models/{owner}/{name}/predictions` with `Prefer: wait=N` (a fast model answers with
the finished prediction), else poll `urls.get` until a terminal status. Output is one URI. Moderation
is a `failed` prediction whose error carries "(E005)".
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..catalog import ProviderEntry
from .base import ImageJob
from .remote import Malformed, Moderated, Poll, RemoteProvider, Task, TaskFailed, safety_tolerance

# The `aspect_ratio` enum shared by every Kontext model on Replicate (besides "match_input_image").
RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "4:5", "5:4", "21:9", "9:21", "2:1", "1:2")
# Short sync wait: a quick model saves the polls, yet an abandoned request is not left blind (no task
# id to cancel) for long while the create call is held open.
PREFER_WAIT_S = 5
PENDING = ("starting", "processing")


class ReplicateProvider(RemoteProvider):
    name = "replicate"
    credential_field = "replicate_api_token"
    base_url_field = "replicate_base_url"
    credential_env = "REPLICATE_API_TOKEN"
    batch_limit = 1  # no num_outputs on Kontext: the base fans `n` out, one prediction per image
    output_formats = ("png", "jpeg")
    credential_hosts = ("api.replicate.com",)  # where urls.get / urls.cancel live
    # pro/max and [dev] share this table; handling() drops the [dev]-only fields for pro/max.
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        "prompt": {"handling": "native", "as": "input.prompt"},
        "image": {
            "handling": "renamed",
            "as": "input.input_image (data URI); two images: "
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
            "as": "input.output_format (jpeg -> jpg; [dev] also webp; "
            "other formats made as png and converted by the gateway)",
        },
        "output_compression": {"handling": "emulated", "as": "gateway (also input.output_quality on [dev])"},
        "response_format": {"handling": "emulated", "as": "gateway"},
        "cfg_scale": {"handling": "renamed", "as": "input.guidance (0-10)"},
        "num_inference_steps": {"handling": "renamed", "as": "input.num_inference_steps (4-50)"},
    }
    DEV_ONLY = ("cfg_scale", "num_inference_steps")

    def handling(self, entry: ProviderEntry) -> dict[str, dict[str, str]]:
        table = dict(self.HANDLING)
        if not _is_dev(entry):
            for name in self.DEV_ONLY:
                table.pop(name)
        return table

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    def unsupported(self, entry: ProviderEntry, job: ImageJob) -> str | None:
        if _is_dev(entry) and not job.images:
            return "[dev] on Replicate only edits (input_image is required)"
        return super().unsupported(entry, job)

    async def submit(self, entry: ProviderEntry, job: ImageJob, count: int) -> Task:
        model, inputs = await self._input(entry, job)
        resp = await self.request(
            "POST",
            f"{self.base_url}/v1/models/{model}/predictions",
            json={"input": inputs},
            headers={"Prefer": f"wait={PREFER_WAIT_S}"},
        )
        prediction = self.json(resp)
        urls = prediction.get("urls")
        if not isinstance(prediction.get("id"), str) or not isinstance(urls, dict) or not urls.get("get"):
            raise Malformed("the created prediction has no id or urls.get", status=resp.status_code)
        # Keep Replicate's own URLs: they are where this prediction lives.
        task = Task(id=prediction["id"], data={"get": urls["get"], "cancel": urls.get("cancel")})
        outcome = _outcome(prediction)
        if outcome.done:
            task.outputs = outcome.outputs
        return task

    async def poll(self, entry: ProviderEntry, task: Task) -> Poll:
        resp = await self.request("GET", task.data["get"])
        return _outcome(self.json(resp))

    async def cancel(self, entry: ProviderEntry, task: Task) -> None:
        if task.data.get("cancel"):
            await self.request("POST", task.data["cancel"])

    # -- the model input ---------------------------------------------------------------------------------

    async def _input(self, entry: ProviderEntry, job: ImageJob) -> tuple[str, dict[str, Any]]:
        """(owner/name of the model to run, its `input`). Passthrough first, so ours win."""
        images = await self.input_data_uris(job)
        extra = self.passthrough(job)
        if "safety_tolerance" in extra:
            extra["safety_tolerance"] = safety_tolerance(extra["safety_tolerance"], has_image=bool(images))
        inputs: dict[str, Any] = {**extra, "prompt": job.prompt, "seed": job.seed, "aspect_ratio": self._ratio(job)}
        if _is_dev(entry):
            fmt = self.upstream_format(job, ("png", "jpeg", "webp"))
            inputs.update(input_image=images[0], output_format=_replicate_format(fmt))
            # Send the catalog's defaults when unset, so the schema's advertised defaults hold.
            steps = job.steps or job.model.default_steps
            guidance = job.guidance if job.guidance is not None else job.model.default_guidance
            if steps is not None:
                inputs["num_inference_steps"] = max(4, min(50, steps))
            if guidance is not None:
                inputs["guidance"] = max(0.0, min(10.0, guidance))
            if job.output_compression is not None:
                inputs["output_quality"] = job.output_compression
            return entry.provider_model_id, inputs
        inputs["output_format"] = _replicate_format(self.upstream_format(job))
        if len(images) == 2:  # the official pro/max models take one image; the multi-image apps two
            inputs.update(input_image_1=images[0], input_image_2=images[1])
            variant = entry.provider_model_id.rsplit("-", 1)[-1]  # "pro" or "max"
            return f"flux-kontext-apps/multi-image-kontext-{variant}", inputs
        if images:
            inputs["input_image"] = images[0]
        return entry.provider_model_id, inputs

    def _ratio(self, job: ImageJob) -> str:
        # An edit with no shape asked keeps the input's (a resolution alone does not change the shape).
        if job.images and (job.size.size is None or (not job.size.exact and job.size.aspect_ratio is None)):
            return "match_input_image"
        return self.aspect_ratio(job, RATIOS) or "1:1"


def _is_dev(entry: ProviderEntry) -> bool:
    return entry.provider_model_id.endswith("-dev")


def _replicate_format(fmt: str) -> str:
    return "jpg" if fmt == "jpeg" else fmt  # Replicate spells it jpg and rejects "jpeg"


def _outcome(prediction: dict[str, Any]) -> Poll:
    """A prediction's state as a Poll; raises for the terminal failures."""
    status = prediction.get("status")
    pid = prediction.get("id")
    if status == "succeeded":
        output = prediction.get("output")
        outputs = [output] if isinstance(output, str) else output  # one URI; a list is accepted too
        if not isinstance(outputs, list) or not all(isinstance(u, str) for u in outputs):
            raise Malformed(f"prediction {pid} succeeded without an output URI")
        return Poll(done=True, outputs=outputs)
    if status == "failed":
        error = str(prediction.get("error") or "no error given")[:300]
        if "(E005)" in error or "flagged as sensitive" in error:
            raise Moderated(error)
        raise TaskFailed(f"prediction {pid} failed: {error}")
    if status in ("canceled", "aborted"):
        raise TaskFailed(f"prediction {pid} was {status}")
    if status in PENDING:
        return Poll(done=False)
    raise Malformed(f"prediction {pid} has an unknown status {str(status)[:40]!r}")
