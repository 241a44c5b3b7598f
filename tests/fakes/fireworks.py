"""A fake Fireworks AI FLUX.1 Kontext workflows API.

Faithful where the gateway depends on it: Bearer auth, `{"request_id"}` on submit, `get_result` polled
by POST with `{"id"}` (`Pending` for `pending_polls` polls, or `states` cycled, then `Ready` with
`result.sample`), `Task not found` for ids it does not know (or asked under another model), and results
served as real images from expiring URLs on the fake itself. BFL's statuses on its own routes.

Bodies are checked against the published schemas (fireworks.flux-kontext-pro / -max, closed: no
input_image_2..4, output_format jpeg or png; the poll body fireworks.get_result), then like BFL's API,
whose protocol Fireworks copies: input_image base64 (bare or as a data URI) or an http(s) URL,
aspect_ratio between 21:9 and 9:21. Fireworks documents no error body for these routes, so a refusal is
BFL's FastAPI 422 `{"detail": [{"loc", "msg", "type"}]}`; the documented "limit of 2 for image to
image" (safety_tolerance) answers 400. Each refusal is kept in `fake.refused`.

Faults (tests/fakes/common.py): HTTP kinds at "submit" / "poll" / "download"; "moderation" ends the task
`Request Moderated` (at submit) or `Content Moderated` (at poll; `variant=` names the status instead)
with `details["Moderation Reasons"]`: `reasons=`, by default ["Derivative Works Filter"] (the one seen
in the wild is ["Safety Filter"]); "task_error" ends it `Error`.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from kontext_gateway.providers import contracts

from .common import (
    Fault,
    Faults,
    Received,
    Refusal,
    ResultStore,
    Upload,
    detail_lines,
    http_fault,
    pydantic_detail,
    record,
)
from .replicate import ratio_of

MODELS = ("flux-kontext-pro", "flux-kontext-max")
PREFIX = "/inference/v1/workflows/accounts/fireworks/models"
MODERATION_REASONS = ["Derivative Works Filter"]
MODERATED = ("Request Moderated", "Content Moderated")


def _error(status: int, headers: dict[str, str] | None = None) -> Response:
    """Fireworks' error answers: a JSON error object for client errors, plain text from the edge for 5xx."""
    if status >= 500:
        return PlainTextResponse(
            {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "error"),
            status,
            headers=headers,
        )
    kind, message = {
        401: ("unauthorized", "The API key you provided is invalid."),
        402: ("payment_required", "Account is suspended: please add a payment method."),
        429: ("rate_limit_exceeded", "Request rate limit exceeded, please try again later."),
    }.get(status, ("error", "error"))
    return JSONResponse({"error": {"object": "error", "type": kind, "message": message}}, status, headers=headers)


def _decode(value: str) -> Image.Image | None:
    """The image in base64, bare or as a data URI; None when it does not decode."""
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        im = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        im.load()
        return im
    except (binascii.Error, OSError, ValueError):
        return None


class FakeFireworks:
    def __init__(self, *, key: str = "fw_test", pending_polls: int = 2, results: ResultStore | None = None) -> None:
        self.key = key
        self.pending_polls = pending_polls  # polls answered Pending before Ready
        self._made = pending_polls
        self.states: tuple[str, ...] = ("Pending",)  # in-progress statuses, cycled while pending
        self.results = results or ResultStore()
        self.faults = Faults()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []  # (method, path, headers, json)
        self.received: list[Received] = []
        self.refused: list[Refusal] = []
        self.uploads: list[Upload] = []  # Fireworks has no upload API: always empty
        self.other_origins: list[str] = []  # one host
        self.tasks: dict[str, dict[str, Any]] = {}
        self.app = Starlette(
            routes=[
                Route(PREFIX + "/{model}", self.submit, methods=["POST"]),
                Route(PREFIX + "/{model}/get_result", self.get_result, methods=["POST"]),
                Route("/results/{name}", self.result, methods=["GET"]),
            ]
        )

    def reset(self) -> None:
        """As made: no faults, nothing logged, `pending_polls` and `states` back where they were."""
        self.faults.clear()
        self.requests.clear()
        self.received.clear()
        self.refused.clear()
        self.pending_polls, self.states = self._made, ("Pending",)

    def submits(self) -> list[tuple[str, str, dict[str, str], Any]]:
        return [r for r in self.requests if r[0] == "POST" and not r[1].endswith("/get_result")]

    async def _record(self, request: Request) -> Any:
        return await record(self.requests, request, received=self.received)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.key}"

    async def _fault(self, point: str, request: Request) -> tuple[Response | None, Fault | None]:
        fault = self.faults.take(point)
        if fault is None:
            return None, None
        if fault.kind in ("moderation", "task_error"):
            return None, fault
        return await http_fault(fault, _error, request), None

    def _refuse(self, key: str, body: Any) -> Response | None:
        """The answer to a body the route's schema (or BFL-style checks) refuses, or None."""
        problems = contracts.request_problems(key, body)
        capped = [p for p in problems if p.conditional]
        detail = pydantic_detail([p for p in problems if not p.conditional], contracts.route_schema(key))
        flagged = {p.path[0] for p in problems if p.path}
        if isinstance(body, dict):
            detail += [item for item in _semantic(body) if item["loc"][1] not in flagged]
        if detail:
            self.refused.append(Refusal(key, 422, detail_lines(detail)))
            return JSONResponse({"detail": detail}, 422)
        if capped:  # safety_tolerance over 2 with an input image
            self.refused.append(Refusal(key, 400, [str(p) for p in capped]))
            return JSONResponse({"detail": "safety_tolerance: limit of 2 for image to image"}, 400)
        return None

    async def submit(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return _error(401)
        replacement, fault = await self._fault("submit", request)
        if replacement is not None:
            return replacement
        model = request.path_params["model"]
        if model not in MODELS:
            return JSONResponse(
                {"error": {"object": "error", "type": "not_found", "message": f"Model not found: {model}"}}, 404
            )
        refused = self._refuse(f"fireworks.{model}", body)
        if refused is not None:
            return refused
        rid = str(uuid.uuid4())
        self.tasks[rid] = {
            "model": model,
            "input": body,
            "polls": 0,
            "polls_left": 0 if fault else self.pending_polls,
            "fate": None,
            "reasons": None,
            "base": str(request.base_url).rstrip("/"),
            "start": time.time(),
            "answer": None,
        }
        if fault is not None:
            self._doom(self.tasks[rid], fault, "Request Moderated")
        return JSONResponse({"request_id": rid})

    @staticmethod
    def _doom(task: dict[str, Any], fault: Fault, moderated: str) -> None:
        if fault.kind == "moderation":
            task["fate"] = fault.variant if fault.variant in MODERATED else moderated
            task["reasons"] = fault.reasons or MODERATION_REASONS
        else:
            task["fate"] = fault.kind
        task["polls_left"] = 0

    async def get_result(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return _error(401)
        replacement, fault = await self._fault("poll", request)
        if replacement is not None:
            return replacement
        refused = self._refuse("fireworks.get_result", body)
        if refused is not None:
            return refused
        rid = body["id"]
        task = self.tasks.get(rid)
        if task is None or task["model"] != request.path_params["model"]:
            return JSONResponse(
                {"id": rid, "status": "Task not found", "result": None, "progress": None, "details": None}
            )
        if task["answer"] is None:
            if fault is not None:
                self._doom(task, fault, "Content Moderated")
            if task["polls_left"] > 0:
                task["polls_left"] -= 1
                task["polls"] += 1
                return JSONResponse(
                    {
                        "id": rid,
                        "status": self.states[(task["polls"] - 1) % len(self.states)],
                        "result": None,
                        "progress": round(1 - (task["polls_left"] + 1) / (self.pending_polls + 1), 2),
                        "details": None,
                    }
                )
            task["answer"] = self._finish(rid, task)
        return JSONResponse(task["answer"])

    def _finish(self, rid: str, task: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = {"id": rid, "result": None, "progress": None, "details": None}
        fate = task["fate"]
        if fate in MODERATED:
            return {**answer, "status": fate, "details": {"Moderation Reasons": task["reasons"]}}
        if fate == "task_error":
            return {**answer, "status": "Error", "details": {"error": "Generation failed: internal error"}}
        inputs = task["input"]
        ratio = inputs.get("aspect_ratio")
        if ratio is None:  # the input's shape for an edit, else 1:1 (BFL's defaults)
            im = _decode(inputs.get("input_image") or "")
            ratio = ratio_of(im) if im is not None else "1:1"
        seed = inputs.get("seed") or 0
        url, _ = self.results.image_url(task["base"], ratio, inputs.get("output_format") or "png", seed=seed)
        end = time.time()
        return {
            **answer,
            "status": "Ready",
            "progress": 1.0,
            "result": {
                "sample": url,
                "prompt": inputs["prompt"],
                "seed": seed,
                "start_time": task["start"],
                "end_time": end,
                "duration": end - task["start"],
            },
        }

    async def result(self, request: Request) -> Response:
        await self._record(request)
        return await self.results.serve(request, self.faults)


def _semantic(body: dict[str, Any]) -> list[dict[str, Any]]:
    """What BFL's API checks beyond the schema, which Fireworks' copy of it is taken to check too."""
    problems = []
    image = body.get("input_image")
    if isinstance(image, str) and not image.startswith(("http://", "https://")) and _decode(image) is None:
        problems.append(
            {"loc": ["body", "input_image"], "msg": "Invalid image: base64 or an http(s) URL", "type": "value_error"}
        )
    ratio = body.get("aspect_ratio")
    if isinstance(ratio, str):
        try:
            w, h = (float(x) for x in ratio.split(":"))
            in_range = w > 0 and h > 0 and 9 / 21 - 1e-9 <= w / h <= 21 / 9 + 1e-9
        except ValueError:
            in_range = False
        if not in_range:
            problems.append(
                {
                    "loc": ["body", "aspect_ratio"],
                    "msg": "Aspect ratio must be between 21:9 and 9:21",
                    "type": "value_error",
                }
            )
    return problems
