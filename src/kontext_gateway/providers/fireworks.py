"""Fireworks AI: FLUX.1 Kontext [pro] / [max] through its workflows API, in BFL's protocol (bfl.py).

Submit `POST /inference/v1/workflows/{model}` -> `{"request_id"}`; poll
`POST /inference/v1/workflows/{model}/get_result` with `{"id"}` (its page's header says GET; its samples
and the Vercel SDK POST) until `Ready` (`result.sample` is the image URL). One input image, at most
safety_tolerance 2 with it; one image per task; no cancel.
"""

from __future__ import annotations

from typing import ClassVar

from ..catalog import ProviderEntry
from .base import ImageJob
from .bfl import BFLProtocol
from .calls import Answer, Call, Task
from .dialect import Submission, json_object
from .errors import Malformed
from .routes import Route, route


class Fireworks(BFLProtocol):
    name = "fireworks"
    credential_field = "fireworks_api_key"
    base_url_field = "fireworks_base_url"
    credential_env = "FIREWORKS_API_KEY"
    image_safety_cap = 2  # "Limit of 2 for Image to Image"
    HANDLING: ClassVar[dict[str, dict[str, str]]] = {
        **BFLProtocol.HANDLING,
        "image": {"handling": "renamed", "as": "input_image (data URI; one image)"},
        "output_format": {"handling": "native", "as": "output_format (jpeg, png; others converted by the gateway)"},
    }

    def credentials(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def route(self, entry: ProviderEntry, job: ImageJob) -> Route:
        return route("fireworks", entry.provider_model_id.rsplit("/", 1)[-1])

    def _url(self, entry: ProviderEntry) -> str:
        return f"{self.base_url}/inference/v1/workflows/{entry.provider_model_id}"

    def submit(self, entry: ProviderEntry, job: ImageJob, count: int, images: list[str]) -> Submission:
        target = self.route(entry, job)
        body, adjusted = self.body(job, target, images)
        if images:
            body["input_image"] = images[0]
        return Submission(
            Call("POST", self._url(entry), json=body), count, target, ignored=self.ignored(job, body), adjusted=adjusted
        )

    def submitted(self, entry: ProviderEntry, answer: Answer, count: int) -> Task:
        request_id = json_object(answer, "Fireworks' submit answer").get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise Malformed("Fireworks' submit answer has no request_id", status=answer.status)
        return Task(id=request_id)

    def poll(self, entry: ProviderEntry, task: Task) -> Call:
        return Call("POST", f"{self._url(entry)}/get_result", json={"id": task.id})
