"""A fake Black Forest Labs API for FLUX.1 Kontext.

    POST /v1/flux-kontext-pro | /v1/flux-kontext-max -> {id, polling_url, cost, input_mp, output_mp}
    GET  {polling_url} = /v1/get_result?id=...       -> {id, status, result, progress, details, preview}
    GET  /results/{name}?se=...&sig=...              -> the image (expiring, like delivery.*.bfl.ai)

Two hosts, as on BFL: submits go to the fake's own URL (api.bfl.ai), and the `polling_url` it returns
names its polling cluster, an `Annex` on another loopback host and port (`fake.polling.url`, like
api.us1.bfl.ai). Only that cluster knows the task: a poll sent to the submit host (a client that
rebuilt the URL from its base URL) answers 404 `Task not found`, and is kept in `fake.misrouted`. The
gateway must be told the cluster's origin takes the key: `fake.other_origins`, for `provider_hosts`.

Auth is `x-key` on every call. A body is checked against the route's published schema
(bfl.flux-kontext-pro / -max: closed, so an unknown field is refused; `output_format` jpeg, png or
webp), then like BFL's FastAPI model: `input_image*` bare base64 or a URL (a `data:` prefix is refused),
`aspect_ratio` between 21:9 and 9:21. Refused: 422 `{"detail": [{"loc", "msg", "type"}]}`, kept in
`fake.refused`. A task is `Pending` for `pending_polls` polls (or `states`, cycled: the newer progress
states "Reasoning" and "Generating" that some clients report, outside the published enum: still
running), then `Ready`; one nobody polls finishes after `run_s` seconds, as a real one does; with
`overlap` set, tasks stay pending until that many were active at once. At most 24 active tasks, 6 of
them kontext-max: more answer 429; `peak` keeps the highest counts seen.

Provider fault kinds: "moderation" (at submit: `Request Moderated`; later: `Content Moderated`;
`variant=` names the status instead; `details["Moderation Reasons"]` is `reasons=`, by default
["Derivative Works Filter"] at submit and ["NSFW"] later; the documented one is ["Safety Filter"]),
"moderation_503" (the same, answered with HTTP 503), "task_error" (status `Error`), "not_found" (the
poll answers 404 `Task not found`), "foreign_url" (at submit: the polling_url names `location`,
another host).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kontext_gateway.providers import contracts

from .common import (
    Annex,
    Faults,
    Received,
    Refusal,
    ResultStore,
    Upload,
    annexes,
    detail_lines,
    http_fault,
    make_image,
    output_size,
    pydantic_detail,
    record,
)

MODELS = {"flux-kontext-pro": 4.0, "flux-kontext-max": 8.0}  # credits per image
ACCOUNT_LIMIT = 24
MODEL_LIMITS = {"flux-kontext-max": 6}
ERRORS = {
    401: "Not authenticated",
    402: "Insufficient credits",
    429: "You have exceeded the rate limit",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_RATIO = re.compile(r"^(\d+):(\d+)$")
TERMINAL = ("Ready", "Request Moderated", "Content Moderated", "Error")
MODERATED = ("Request Moderated", "Content Moderated")


@dataclass
class BFLTask:
    id: str
    model: str
    body: dict[str, Any]
    input_ratio: str | None
    polls: int = 0
    status: str = "Pending"  # or a terminal status set by a fault
    base: str = ""  # the submit host's URL: results are served there, not on the polling cluster
    details: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.monotonic)


class FakeBFL:
    def __init__(
        self, *, key: str = "bfl_test", pending_polls: int = 2, run_s: float = 2.0, results: ResultStore | None = None
    ) -> None:
        self.key = key
        self._made = (pending_polls, run_s)
        self.pending_polls = pending_polls
        self.run_s = run_s
        self.states: tuple[str, ...] = ("Pending",)  # in-progress statuses, cycled while pending
        # Tasks stay pending until this many were active at once (or `hold_s` passed): tasks that may
        # overlap then do, however far apart a busy machine sends them.
        self.overlap = 0
        self.hold_s = 60.0
        self.results = results or ResultStore()
        self.faults = Faults()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []  # (method, path?query, headers, json)
        self.received: list[Received] = []  # every request's body size, on either host
        self.refused: list[Refusal] = []
        self.uploads: list[Upload] = []  # BFL has no upload API: always empty
        self.misrouted: list[str] = []  # polls sent to the submit host instead of the returned polling_url
        self.tasks: dict[str, BFLTask] = {}
        self.peak: dict[str, int] = {}  # highest active-task count seen: "total" and per model
        self.polling = Annex(Starlette(routes=[Route("/v1/get_result", self._poll, methods=["GET"])]))
        self.app = Starlette(
            routes=[
                Route("/results/{name}", self._download, methods=["GET"]),
                Route("/v1/get_result", self._misrouted_poll, methods=["GET"]),
                Route("/v1/{model}", self._submit, methods=["POST"]),
            ],
            lifespan=annexes(self.polling),
        )

    @property
    def other_origins(self) -> list[str]:
        """Origins besides its own that take the key: the polling cluster (while it runs)."""
        return [self.polling.url] if self.polling.url else []

    def reset(self) -> None:
        """As made: no faults, nothing logged, no tasks (a failed attempt's would count as active), the
        knobs tests turn back where they were."""
        self.faults.clear()
        self.requests.clear()
        self.received.clear()
        self.refused.clear()
        self.misrouted.clear()
        self.peak.clear()
        self.tasks.clear()
        self.pending_polls, self.run_s = self._made
        self.states, self.overlap = ("Pending",), 0

    def submits(self) -> list[tuple[str, dict[str, Any]]]:
        return [(path, body) for method, path, _, body in self.requests if method == "POST"]

    def active(self, model: str | None = None) -> int:
        return sum(1 for t in self.tasks.values() if not self._done(t) and model in (None, t.model))

    def _done(self, task: BFLTask) -> bool:
        return task.status in TERMINAL or time.monotonic() - task.created > self.run_s

    def _held(self, task: BFLTask) -> bool:
        return self.peak.get("total", 0) < self.overlap and time.monotonic() - task.created < self.hold_s

    async def _record(self, request: Request) -> Any:
        return await record(self.requests, request, with_query=True, received=self.received)

    @staticmethod
    def _error(status: int, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": ERRORS.get(status, "error")}, status_code=status, headers=headers)

    async def _submit(self, request: Request) -> Response:
        body = await self._record(request)
        if request.headers.get("x-key") != self.key:
            return self._error(401)
        fault = self.faults.take("submit")
        if (
            fault is not None
            and fault.kind not in ("moderation", "moderation_503", "task_error", "foreign_url")
            and (replacement := await http_fault(fault, self._error, request)) is not None
        ):
            return replacement
        model = request.path_params["model"]
        if model not in MODELS:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        key = f"bfl.{model}"
        errors, input_ratio = validate(key, body)
        if errors:
            self.refused.append(Refusal(key, 422, detail_lines(errors)))
            return JSONResponse({"detail": errors}, status_code=422)
        limit = MODEL_LIMITS.get(model)
        if self.active() >= ACCOUNT_LIMIT or (limit is not None and self.active(model) >= limit):
            return JSONResponse({"detail": "Too many active tasks: wait for some to finish"}, status_code=429)
        base = str(request.base_url).rstrip("/")
        task = BFLTask(uuid.uuid4().hex, model, body, input_ratio, base=base)
        if fault is not None and fault.kind.startswith("moderation"):
            status = fault.variant if fault.variant in MODERATED else "Request Moderated"
            task.status, task.details = status, {"Moderation Reasons": fault.reasons or ["Derivative Works Filter"]}
        elif fault is not None and fault.kind == "task_error":
            task.status, task.details = "Error", {"error": "Generation failed"}
        self.tasks[task.id] = task
        self.peak["total"] = max(self.peak.get("total", 0), self.active())
        self.peak[model] = max(self.peak.get(model, 0), self.active(model))
        # The task's cluster, another host than the one submitted to (or `location`, another host still).
        poll_base = self.polling.url or base
        if fault is not None and fault.kind == "foreign_url" and fault.location:
            poll_base = fault.location
        w, h = output_size(body.get("aspect_ratio") or input_ratio, 1.0)
        mp = round(w * h / 1e6, 2)
        return JSONResponse(
            {
                "id": task.id,
                "polling_url": f"{poll_base}/v1/get_result?id={task.id}",
                "cost": MODELS[model],
                "input_mp": mp if input_ratio else 0.0,
                "output_mp": mp,
            }
        )

    async def _poll(self, request: Request) -> Response:
        await self._record(request)
        if request.headers.get("x-key") != self.key:
            return self._error(401)
        task = self.tasks.get(request.query_params.get("id", ""))
        status_code = 200
        fault = self.faults.take("poll")
        if fault is not None:
            if fault.kind == "not_found":
                task = None
            elif fault.kind.startswith("moderation") and task is not None:
                task.status = fault.variant if fault.variant in MODERATED else "Content Moderated"
                task.details = {"Moderation Reasons": fault.reasons or ["NSFW"]}
                status_code = 503 if fault.kind == "moderation_503" else 200
            elif fault.kind == "task_error" and task is not None:
                task.status, task.details = "Error", {"error": "Generation failed"}
            elif (replacement := await http_fault(fault, self._error, request)) is not None:
                return replacement
        if task is None:
            return JSONResponse(
                {
                    "id": request.query_params.get("id"),
                    "status": "Task not found",
                    "result": None,
                    "progress": None,
                    "details": None,
                    "preview": None,
                },
                status_code=404,
            )
        task.polls += 1
        body: dict[str, Any] = {
            "id": task.id,
            "result": None,
            "progress": None,
            "details": task.details,
            "preview": None,
        }
        if task.status not in ("Pending", "Ready"):
            return JSONResponse({**body, "status": task.status}, status_code=status_code)
        if (task.polls <= self.pending_polls and not self._done(task)) or self._held(task):
            state = self.states[(task.polls - 1) % len(self.states)]
            progress = round(min(task.polls, self.pending_polls) / (self.pending_polls + 1), 2)
            return JSONResponse({**body, "status": state, "progress": progress})
        if task.result is None:
            task.status = "Ready"
            task.result = self._make_result(task.base, task)
        return JSONResponse({**body, "status": "Ready", "result": task.result, "progress": 1.0})

    async def _misrouted_poll(self, request: Request) -> Response:
        """A poll on the submit host: this host took no task, whatever the id (as another cluster would)."""
        await self._record(request)
        if request.headers.get("x-key") != self.key:
            return self._error(401)
        self.misrouted.append(str(request.url))
        return JSONResponse(
            {"id": request.query_params.get("id"), "status": "Task not found", "result": None, "details": None},
            status_code=404,
        )

    async def _download(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path, dict(request.headers), None))
        return await self.results.serve(request, self.faults)

    def _make_result(self, base: str, task: BFLTask) -> dict[str, Any]:
        ratio = task.body.get("aspect_ratio") or task.input_ratio or "1:1"
        fmt = task.body.get("output_format") or "png"  # BFL's default is png
        seed = int(task.body.get("seed") or 0)
        w, h = output_size(ratio, self.results.scale)
        url = self.results.add(base, make_image(w, h, fmt, seed), f"image/{fmt}", "jpg" if fmt == "jpeg" else fmt)
        # Delivery URLs are signed and expire in 10 minutes.
        return {
            "sample": f"{url}?se={int(time.time()) + 600}&sig=fake-signature",
            "prompt": task.body["prompt"],
            "seed": seed,
            "start_time": time.time() - 1.5,
            "end_time": time.time(),
            "duration": 1.5,
        }


# -- validation: the published schema, then what BFL's FastAPI model checks beyond it --------------------


def validate(key: str, body: Any) -> tuple[list[dict[str, Any]], str | None]:
    """422 detail items for what BFL would reject, and input_image's ratio ("W:H") when it has one."""
    problems = contracts.request_problems(key, body)
    errors = pydantic_detail(problems, contracts.route_schema(key))
    if not isinstance(body, dict):
        return errors, None
    flagged = {p.path[0] for p in problems if p.path}

    def err(loc: str, msg: str, type_: str) -> None:
        if loc not in flagged:  # one error per field, the schema's first
            errors.append({"loc": ["body", loc], "msg": msg, "type": type_})

    ratio = None
    for name in ("input_image", "input_image_2", "input_image_3", "input_image_4"):
        value = body.get(name)
        if not isinstance(value, str):
            continue
        size = _image_size(value)
        if size is None:
            err(name, "Invalid image: send the bare base64 payload (no data: prefix) or an http(s) URL", "value_error")
        elif name == "input_image" and size != (0, 0):
            ratio = f"{size[0]}:{size[1]}"
    if isinstance(ar := body.get("aspect_ratio"), str):  # the OpenAPI has no pattern: BFL's own check
        m = _RATIO.match(ar)
        if not m or int(m.group(2)) == 0 or not 9 / 21 - 1e-9 <= int(m.group(1)) / int(m.group(2)) <= 21 / 9 + 1e-9:
            err("aspect_ratio", "Value error, aspect ratio must be between 21:9 and 9:21", "value_error")
    return errors, ratio


def _image_size(value: Any) -> tuple[int, int] | None:
    """(w, h) of a base64 image, (0, 0) for an http(s) URL (not fetched), None when unusable."""
    if not isinstance(value, str) or value.startswith("data:"):
        return None
    if value.startswith(("http://", "https://")):
        return (0, 0)
    try:
        with Image.open(io.BytesIO(base64.b64decode(value, validate=True))) as im:
            return im.size
    except (binascii.Error, ValueError, OSError):
        return None
