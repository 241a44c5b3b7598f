"""Black Forest Labs' API (https://docs.bfl.ai) for FLUX.1 Kontext [pro] and [max], and the protocol
it shares with Fireworks (fireworks.py): submit a task, poll it until a terminal status, read
`result.sample`.

BFL: submit `POST {base}/v1/flux-kontext-pro|max` with `x-key`, then poll the returned `polling_url`,
and only that: it names the cluster that took the task (`api.us1.bfl.ai`...; another cluster answers
`Task not found`), so it is never rebuilt. `Ready` gives `result.sample`, a signed URL valid for 10
minutes. One image per task, up to four input images (`input_image`, `input_image_2..4`, bare base64);
at most 24 active tasks per account, 6 of them for kontext-max. There is no cancel.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..catalog import ProviderEntry
from .base import ImageJob
from .calls import Answer, Call, Done, Encoded, Pending, Polled, Task
from .dialect import Dialect, Submission, json_object
from .errors import Malformed, Moderated, TaskFailed, TaskLost, UpstreamError
from .inputs import bare_base64
from .moderation import flagged
from .routes import Route, route

# Kontext's 11 trained ratios, all within the 21:9 .. 9:21 the API takes.
RATIOS = ("21:9", "16:9", "4:3", "3:2", "5:4", "1:1", "4:5", "2:3", "3:4", "9:16", "9:21")
READY = "Ready"
MODERATED = ("Request Moderated", "Content Moderated")  # the input / the output was flagged
FAILED = ("Error", "Failed")
LOST = "Task not found"  # unknown or expired: resubmitted (once)
TERMINAL = (READY, *MODERATED, *FAILED, LOST)


class BFLProtocol(Dialect):
    """What BFL and Fireworks share: the body's fields, the statuses, moderation, `result.sample`.
    Statuses the published schemas do not list (`Reasoning`, `Generating`, progress states newer
    clients report) mean the task still runs."""

    HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        "prompt": {"handling": "native", "as": "prompt"},
        "seed": {"handling": "native", "as": "seed"},
        "size": {
            "handling": "converted",
            "as": "aspect_ratio 'W:H' (nearest Kontext ratio; left out on an edit to keep the input's)",
        },
        "aspect_ratio": {"handling": "converted", "as": "aspect_ratio 'W:H' (nearest Kontext ratio)"},
        "n": {"handling": "emulated", "as": "one task per image, in parallel"},
        "response_format": {"handling": "emulated", "as": "gateway"},
        "output_compression": {"handling": "emulated", "as": "gateway"},
    }

    def body(self, job: ImageJob, route: Route, images: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """(the submit body, adjusted parameters). The request's extra parameters first: ours win."""
        body = self.passthrough(job, route)  # prompt_upsampling, safety_tolerance, webhook_url...
        adjusted: dict[str, str] = {}
        if "safety_tolerance" in body:
            body["safety_tolerance"] = as_int(body["safety_tolerance"])
            if images and (cap := self.image_safety_cap) is not None and _over(body["safety_tolerance"], cap):
                body["safety_tolerance"] = cap
                adjusted["safety_tolerance"] = f"sent {cap}: {self.name} takes at most {cap} with an input image"
        body.update(prompt=job.prompt, seed=job.seed, output_format=self.upstream_format(job, route))
        if not self.keeps_input_shape(job):  # left out on an edit, so the output keeps the input's shape
            body["aspect_ratio"] = self.aspect_ratio(job, RATIOS) or "1:1"
        return body, adjusted

    image_safety_cap: ClassVar[int | None] = None  # the safety_tolerance allowed with an input image

    # -- answers --------------------------------------------------------------------------------------

    def state(self, task: Task, answer: Answer) -> Polled:
        body = json_object(answer, f"{self.name} task {task.id}")
        status = body.get("status")
        if status == READY:
            result = body.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str) or not sample:
                raise Malformed(f"{self.name} task {task.id} is Ready without result.sample", status=answer.status)
            return Done([sample])
        if (signal := flagged(self.name, "status", status)) is not None:
            raise Moderated(f"{status}: {signal.means}{_reasons(body.get('details'))}", status=answer.status)
        if status == LOST:
            raise TaskLost(f"{self.name} task {task.id}: {LOST}", status=answer.status)
        if status in FAILED:
            raise TaskFailed(f"{self.name} task {task.id} ended {status!r}{_reasons(body.get('details'))}")
        if isinstance(status, str) and status:
            return Pending()  # Pending, and progress states the published schemas do not list yet
        raise Malformed(f"{self.name} task {task.id}: the answer has no status", status=answer.status)

    def polled(self, entry: ProviderEntry, task: Task, answer: Answer) -> Polled:
        return self.state(task, answer)

    def classify(self, answer: Answer, call: Call) -> UpstreamError | None:
        # A poll's body status is authoritative: a moderated or lost task may come with a 404 or 503.
        if answer.status not in (401, 402, 403, 429) and answer.object().get("status") in TERMINAL:
            return None
        return super().classify(answer, call)


class BFL(BFLProtocol):
    name = "bfl"
    credential_field = "bfl_api_key"
    base_url_field = "bfl_base_url"
    credential_env = "BFL_API_KEY"
    default_concurrency = 24  # active tasks per account
    model_concurrency: ClassVar[dict[str, int]] = {"flux-kontext-max": 6}
    # The documented API hosts: global api.bfl.ai, and the clusters a polling_url names (api.eu.bfl.ai,
    # api.us1.bfl.ai...). Not "*.bfl.ai": delivery.*.bfl.ai and the rest have no use for the key.
    credential_hosts = ("api.bfl.ai", "api.*.bfl.ai")
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        **BFLProtocol.HANDLING,
        "image": {"handling": "renamed", "as": "input_image, input_image_2..4 (bare base64)"},
        "output_format": {
            "handling": "native",
            "as": "output_format (jpeg, png, webp; other formats made as png and converted by the gateway)",
        },
    }

    def credentials(self, key: str) -> dict[str, str]:
        return {"x-key": key}

    def route(self, entry: ProviderEntry, job: ImageJob) -> Route:
        return route("bfl", entry.provider_model_id)

    def image_ref(self, encoded: Encoded, url: str | None) -> str:
        return url if url is not None else bare_base64(encoded)

    def submit(self, entry: ProviderEntry, job: ImageJob, count: int, images: list[str]) -> Submission:
        target = self.route(entry, job)
        body, adjusted = self.body(job, target, images)
        for i, image in enumerate(images):
            body["input_image" if i == 0 else f"input_image_{i + 1}"] = image
        call = Call("POST", f"{self.base_url}/v1/{entry.provider_model_id}", json=body)
        return Submission(call, count, target, ignored=self.ignored(job, body), adjusted=adjusted)

    def submitted(self, entry: ProviderEntry, answer: Answer, count: int) -> Task:
        data = json_object(answer, "BFL's submit answer")
        if not data.get("id") or not isinstance(data.get("polling_url"), str):
            raise Malformed("BFL's submit answer lacks id or polling_url", status=answer.status)
        return Task(id=str(data["id"]), data={"polling_url": data["polling_url"]})

    def poll(self, entry: ProviderEntry, task: Task) -> Call:
        return Call("GET", task.data["polling_url"])  # as returned: it names the task's cluster


def as_int(value: Any) -> Any:
    """An integer field's value as an int where it is one ("3", 3.0); anything else as it is, for the
    schema check to name."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    return value


def _over(value: Any, cap: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > cap


def _reasons(details: Any) -> str:
    """A short reason from `details` (moderation puts a list under "Moderation Reasons")."""
    if isinstance(details, dict) and isinstance(details.get("Moderation Reasons"), list):
        return " (" + ", ".join(str(r) for r in details["Moderation Reasons"])[:200] + ")"
    return f" ({str(details)[:200]})" if details else ""
