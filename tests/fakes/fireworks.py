"""A fake Fireworks AI FLUX.1 Kontext workflows API.

Faithful where the gateway depends on it: Bearer auth, BFL-style input validation (422 FastAPI
`detail` lists; 400 for the image-to-image safety limit), `{"request_id"}` on submit, `get_result`
polled by POST with `{"id"}` (`Pending` for `pending_polls` polls, then `Ready` with `result.sample`),
`Task not found` for ids it does not know (or asked under another model), and results served as real
images from expiring URLs on the fake itself.

Faults (tests/fakes/common.py): HTTP kinds at "submit" / "poll" / "download"; "moderation" ends the task
`Request Moderated` (at submit) or `Content Moderated` (at poll) with `details["Moderation Reasons"]`;
"task_error" ends it `Error`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .common import Faults, ResultStore, http_fault, record
from .replicate import decode_data_uri, ratio_of

MODELS = ("flux-kontext-pro", "flux-kontext-max")
PREFIX = "/inference/v1/workflows/accounts/fireworks/models"
MODERATION_REASONS = ["Derivative Works Filter"]


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


def _loc(field: str, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", field], "msg": msg, "type": kind}


class FakeFireworks:
    def __init__(self, *, key: str = "fw_test", pending_polls: int = 2, results: ResultStore | None = None) -> None:
        self.key = key
        self.pending_polls = pending_polls  # polls answered Pending before Ready
        self._made = pending_polls
        self.results = results or ResultStore()
        self.faults = Faults()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []  # (method, path, headers, json)
        self.tasks: dict[str, dict[str, Any]] = {}
        self.app = Starlette(
            routes=[
                Route(PREFIX + "/{model}", self.submit, methods=["POST"]),
                Route(PREFIX + "/{model}/get_result", self.get_result, methods=["POST"]),
                Route("/results/{name}", self.result, methods=["GET"]),
            ]
        )

    def reset(self) -> None:
        """As made: no faults, nothing logged, `pending_polls` back where it was."""
        self.faults.clear()
        self.requests.clear()
        self.pending_polls = self._made

    def submits(self) -> list[tuple[str, str, dict[str, str], Any]]:
        return [r for r in self.requests if r[0] == "POST" and not r[1].endswith("/get_result")]

    async def _record(self, request: Request) -> Any:
        return await record(self.requests, request)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.key}"

    async def _fault(self, point: str, request: Request) -> tuple[Response | None, str | None]:
        fault = self.faults.take(point)
        if fault is None:
            return None, None
        if fault.kind in ("moderation", "task_error"):
            return None, fault.kind
        return await http_fault(fault, _error, request), None

    @staticmethod
    def _invalid(body: Any) -> tuple[int, Any] | None:
        """(status, detail) of the first problem a BFL-style validator reports, or None."""
        if not isinstance(body, dict):
            return 422, [_loc("body", "Input should be a valid dictionary", "dict_type")]
        problems = []
        if not isinstance(body.get("prompt"), str):
            problems.append(_loc("prompt", "Field required", "missing"))
        fmt = body.get("output_format")
        if fmt is not None and fmt not in ("jpeg", "png"):
            problems.append(_loc("output_format", "Input should be 'jpeg' or 'png'", "enum"))
        for field, kind, ok in (
            ("seed", "int_type", lambda v: isinstance(v, int) and not isinstance(v, bool)),
            ("prompt_upsampling", "bool_type", lambda v: isinstance(v, bool)),
            ("safety_tolerance", "int_type", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 6),
            (
                "input_image",
                "string_type",
                lambda v: (
                    isinstance(v, str) and (decode_data_uri(v) is not None or v.startswith(("http://", "https://")))
                ),
            ),
        ):
            if body.get(field) is not None and not ok(body[field]):
                problems.append(_loc(field, f"Invalid value for {field}", kind))
        ratio = body.get("aspect_ratio")
        if ratio is not None:
            try:
                w, h = (float(x) for x in str(ratio).split(":"))
                in_range = w > 0 and h > 0 and 9 / 21 - 1e-9 <= w / h <= 21 / 9 + 1e-9
            except ValueError:
                in_range = False
            if not in_range:
                problems.append(_loc("aspect_ratio", "Aspect ratio must be between 21:9 and 9:21", "value_error"))
        if problems:
            return 422, problems
        if body.get("input_image") and (body.get("safety_tolerance") or 0) > 2:
            return 400, "safety_tolerance: limit of 2 for image to image"
        return None

    async def submit(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return _error(401)
        replacement, fate = await self._fault("submit", request)
        if replacement is not None:
            return replacement
        model = request.path_params["model"]
        if model not in MODELS:
            return JSONResponse(
                {"error": {"object": "error", "type": "not_found", "message": f"Model not found: {model}"}}, 404
            )
        problem = self._invalid(body)
        if problem is not None:
            return JSONResponse({"detail": problem[1]}, problem[0])
        rid = str(uuid.uuid4())
        self.tasks[rid] = {
            "model": model,
            "input": body,
            "polls_left": 0 if fate else self.pending_polls,
            "fate": "Request Moderated" if fate == "moderation" else fate,
            "base": str(request.base_url).rstrip("/"),
            "start": time.time(),
            "answer": None,
        }
        return JSONResponse({"request_id": rid})

    async def get_result(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return _error(401)
        replacement, fate = await self._fault("poll", request)
        if replacement is not None:
            return replacement
        rid = body.get("id") if isinstance(body, dict) else None
        task = self.tasks.get(rid) if isinstance(rid, str) else None
        if task is None or task["model"] != request.path_params["model"]:
            return JSONResponse(
                {"id": rid, "status": "Task not found", "result": None, "progress": None, "details": None}
            )
        if task["answer"] is None:
            if fate:
                task["fate"], task["polls_left"] = "Content Moderated" if fate == "moderation" else fate, 0
            if task["polls_left"] > 0:
                task["polls_left"] -= 1
                return JSONResponse(
                    {
                        "id": rid,
                        "status": "Pending",
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
        if fate in ("Request Moderated", "Content Moderated"):
            return {**answer, "status": fate, "details": {"Moderation Reasons": MODERATION_REASONS}}
        if fate == "task_error":
            return {**answer, "status": "Error", "details": {"error": "Generation failed: internal error"}}
        inputs = task["input"]
        ratio = inputs.get("aspect_ratio")
        if ratio is None:  # the input's shape for an edit, else 1:1 (BFL's defaults)
            im = decode_data_uri(inputs.get("input_image") or "")
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
