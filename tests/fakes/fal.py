"""A fake fal.ai queue API for the Kontext routes.

    POST /{model route}                      -> {request_id, response_url, status_url, cancel_url, queue_position}
    GET  /{app}/requests/{id}/status          -> IN_QUEUE, IN_PROGRESS (for `pending_polls` polls), COMPLETED
    GET  /{app}/requests/{id}                 -> {images, seed, has_nsfw_concepts, prompt, timings} or the error
    PUT  /{app}/requests/{id}/cancel          -> 202 CANCELLATION_REQUESTED | 400 ALREADY_COMPLETED | 404
    GET  /results/{name}                      -> the image (expiring)

`{app}` is the first two segments of the route (`fal-ai/flux-pro`), as on fal: the status, response
and cancel URLs drop the route's subpath, so only a client using the returned URLs finds them.
Auth is `Authorization: Key <key>`. The queue accepts any input; like fal's pydantic models, the fake
then rejects bad fields at the response URL, after COMPLETED (422 `{"detail": [{"loc", "msg", "type"}]}`),
as fal does. Provider fault kinds: "moderation" (pro/max: the response URL
answers 422 content_policy_violation; [dev]: `has_nsfw_concepts: [true]`), "task_error" (the
response URL answers 500 with an infrastructure error body) and "foreign_url" (at submit: the status,
response and cancel URLs name `location`, another host).
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from dataclasses import dataclass
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .common import Fault, Faults, ResultStore, http_fault, make_image, output_size, record

# Route -> input type, from the fal-js endpoint types.
ROUTES = {
    "fal-ai/flux-pro/kontext": "edit",
    "fal-ai/flux-pro/kontext/max": "edit",
    "fal-ai/flux-pro/kontext/multi": "multi",
    "fal-ai/flux-pro/kontext/max/multi": "multi",
    "fal-ai/flux-pro/kontext/text-to-image": "t2i",
    "fal-ai/flux-pro/kontext/max/text-to-image": "t2i",
    "fal-ai/flux-kontext/dev": "dev",
    "fal-ai/flux-kontext-lora": "dev",  # the dev fields plus `loras`
}
RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
RESOLUTION_MODES = (
    "auto",
    "match_input",
    "1:1",
    "16:9",
    "21:9",
    "3:2",
    "2:3",
    "4:5",
    "5:4",
    "3:4",
    "4:3",
    "9:16",
    "9:21",
)
TOLERANCES = ("1", "2", "3", "4", "5", "6")
MODERATION_MSG = "The content could not be processed because it contained material flagged by a content checker."
ERRORS = {
    401: "Unauthorized: invalid or missing key",
    402: "Insufficient balance",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
}


@dataclass
class FalTask:
    id: str
    app: str
    route: str
    kind: str
    body: dict[str, Any]
    input_ratio: str | None
    errors: list[dict[str, Any]]  # what fal's input model rejects, answered as a 422
    polls: int = 0
    completed: bool = False  # COMPLETED once, COMPLETED for good
    moderated: bool = False
    failed: bool = False
    cancelled: bool = False
    result: dict[str, Any] | None = None


class FakeFal:
    def __init__(self, *, key: str = "fal_test", pending_polls: int = 2, results: ResultStore | None = None) -> None:
        self.key = key
        self.pending_polls = pending_polls  # polls answered IN_QUEUE / IN_PROGRESS before COMPLETED
        self._made = pending_polls
        self.results = results or ResultStore()
        self.faults = Faults()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []  # (method, path, headers, json)
        self.tasks: dict[str, FalTask] = {}
        self.app = Starlette(
            routes=[
                Route("/results/{name}", self._download, methods=["GET"]),
                Route("/{owner}/{app}/requests/{rid}/status", self._status, methods=["GET"]),
                Route("/{owner}/{app}/requests/{rid}/cancel", self._cancel, methods=["PUT"]),
                Route("/{owner}/{app}/requests/{rid}", self._response, methods=["GET"]),
                Route("/{route:path}", self._submit, methods=["POST"]),
            ]
        )

    # -- helpers -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """As made: no faults, nothing logged, `pending_polls` back where it was."""
        self.faults.clear()
        self.requests.clear()
        self.pending_polls = self._made

    def submits(self) -> list[tuple[str, dict[str, Any]]]:
        """(path, body) of every submit received."""
        return [(path, body) for method, path, _, body in self.requests if method == "POST"]

    async def _record(self, request: Request) -> Any:
        return await record(self.requests, request)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Key {self.key}"

    @staticmethod
    def _error(status: int, headers: dict[str, str] | None = None) -> JSONResponse:
        body: dict[str, Any] = {"detail": ERRORS.get(status, "error")}
        if status >= 500:
            body["error_type"] = "runner_server_error"
            headers = {**(headers or {}), "x-fal-error-type": "runner_server_error"}
        return JSONResponse(body, status_code=status, headers=headers)

    async def _fault(self, point: str, request: Request) -> tuple[Response | None, Fault | None]:
        """(a response to send instead, or None; the fault to apply to the task, "moderation" /
        "task_error" / "foreign_url", or None)."""
        fault = self.faults.take(point)
        if fault is None:
            return None, None
        if fault.kind in ("moderation", "task_error", "foreign_url"):
            return None, fault
        if fault.kind == "result_404" and point == "result":
            return JSONResponse({"detail": "Request not found"}, status_code=404), None
        return await http_fault(fault, self._error, request), None

    @staticmethod
    def _flag(task: FalTask | None, flag: Fault | None) -> None:
        if task is not None and flag is not None:
            task.moderated |= flag.kind == "moderation"
            task.failed |= flag.kind == "task_error"

    def _task(self, request: Request) -> FalTask | None:
        p = request.path_params
        task = self.tasks.get(p["rid"])
        # Only the app root finds the task: a URL rebuilt with the route's subpath does not.
        return task if task is not None and task.app == f"{p['owner']}/{p['app']}" else None

    def _urls(self, base: str, task: FalTask) -> dict[str, str]:
        root = f"{base}/{task.app}/requests/{task.id}"
        return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}

    # -- endpoints -----------------------------------------------------------------------------------

    async def _submit(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        replacement, flag = await self._fault("submit", request)
        if replacement is not None:
            return replacement
        route = request.path_params["route"].strip("/")
        kind = ROUTES.get(route)
        if kind is None:
            return JSONResponse({"detail": f"Application '{route}' not found"}, status_code=404)
        if not isinstance(body, dict):
            return JSONResponse(
                {"detail": [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]},
                status_code=422,
            )
        # The queue takes any input: a validation error surfaces at the response URL once COMPLETED.
        errors, input_ratio = validate(kind, body)
        task = FalTask(
            uuid.uuid4().hex,
            "/".join(route.split("/")[:2]),
            route,
            kind,
            body,
            input_ratio,
            errors,
            moderated=flag is not None and flag.kind == "moderation",
            failed=flag is not None and flag.kind == "task_error",
        )
        self.tasks[task.id] = task
        queued = sum(1 for t in self.tasks.values() if not t.completed)
        base = str(request.base_url).rstrip("/")
        if flag is not None and flag.kind == "foreign_url" and flag.location:
            base = flag.location
        return JSONResponse(
            {"status": "IN_QUEUE", "request_id": task.id, **self._urls(base, task), "queue_position": queued - 1}
        )

    async def _status(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        task = self._task(request)
        replacement, flag = await self._fault("poll", request)
        self._flag(task, flag)
        if replacement is not None:
            return replacement
        if task is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        task.polls += 1
        base = str(request.base_url).rstrip("/")
        common = {"request_id": task.id, **self._urls(base, task)}
        task.completed |= task.polls > self.pending_polls or task.cancelled
        if not task.completed:
            if task.polls == 1:
                return JSONResponse({"status": "IN_QUEUE", "queue_position": 0, **common})
            return JSONResponse({"status": "IN_PROGRESS", "logs": [], **common})
        return JSONResponse({"status": "COMPLETED", "logs": [], "metrics": {"inference_time": 1.7}, **common})

    async def _response(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        task = self._task(request)
        replacement, flag = await self._fault("result", request)
        self._flag(task, flag)
        if replacement is not None:
            return replacement
        if task is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        if not task.completed:
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
        if task.cancelled:
            return JSONResponse({"detail": "Request was cancelled"}, status_code=400)
        if task.errors:
            return JSONResponse({"detail": task.errors}, status_code=422)
        if task.failed:
            return JSONResponse(
                {"detail": "Unexpected error while running the model", "error_type": "internal_server_error"},
                status_code=500,
                headers={"x-fal-error-type": "internal_server_error"},
            )
        if task.moderated and task.kind != "dev":
            # pro/max forward BFL's moderation as a 422 content_policy_violation.
            return JSONResponse(
                {
                    "detail": [
                        {
                            "loc": ["body", "prompt"],
                            "msg": MODERATION_MSG,
                            "type": "content_policy_violation",
                            "url": "https://docs.fal.ai/errors#content_policy_violation",
                            "ctx": {},
                        }
                    ]
                },
                status_code=422,
                headers={"x-fal-retryable": "false"},
            )
        if task.result is None:
            task.result = self._make_result(str(request.base_url).rstrip("/"), task)
        return JSONResponse(task.result)

    async def _cancel(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        task = self._task(request)
        if task is None:
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        if task.completed:
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        task.cancelled = True
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    async def _download(self, request: Request) -> Response:
        self.requests.append((request.method, request.url.path, dict(request.headers), None))
        return await self.results.serve(request, self.faults)

    # -- results ---------------------------------------------------------------------------------------

    def _make_result(self, base: str, task: FalTask) -> dict[str, Any]:
        body = task.body
        if task.kind == "dev":
            mode = body.get("resolution_mode", "match_input")
            ratio = mode if mode not in ("auto", "match_input") else task.input_ratio
        else:
            ratio = body.get("aspect_ratio") or task.input_ratio or "1:1"
        fmt = body.get("output_format", "jpeg")  # fal's default is jpeg
        seed = int(body.get("seed", 42))
        w, h = output_size(ratio, self.results.scale)
        images = []
        for i in range(int(body.get("num_images", 1))):
            data = make_image(w, h, fmt, seed + i)
            ext = "jpg" if fmt == "jpeg" else fmt
            if _bool(body.get("sync_mode")):  # a data URI, kept out of the request history
                url = f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"
            else:
                url = self.results.add(base, data, f"image/{fmt}", ext)
            images.append(
                {
                    "url": url,
                    "width": w,
                    "height": h,
                    "content_type": f"image/{fmt}",
                    "file_name": f"{uuid.uuid4().hex}.{ext}",
                    "file_size": len(data),
                }
            )
        return {
            "images": images,
            "seed": seed,
            "prompt": body["prompt"],
            "has_nsfw_concepts": [task.moderated] * len(images),
            "timings": {"inference": 1.7},
        }


# -- validation, like fal's pydantic input models --------------------------------------------------------


def validate(kind: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """422 detail items for what fal would reject, and the first input image's ratio ("W:H")."""
    errors: list[dict[str, Any]] = []

    def err(loc: str, msg: str, type_: str) -> None:
        errors.append({"loc": ["body", loc], "msg": msg, "type": type_})

    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        err("prompt", "Field required", "missing")
    images: list[Any] = []
    if kind in ("edit", "dev"):
        if "image_url" not in body:
            err("image_url", "Field required", "missing")
        else:
            images = [body["image_url"]]
    elif kind == "multi":
        urls = body.get("image_urls")
        if not isinstance(urls, list) or not urls:
            err("image_urls", "Field required" if urls is None else "Input should be a non-empty list", "missing")
        else:
            images = urls
    ratio = None
    for i, url in enumerate(images):
        size = _image_size(url)
        if size is None:
            err(
                "image_url" if kind != "multi" else f"image_urls.{i}",
                "Failed to load the image. Please ensure the image file is not corrupted and is in a supported format.",
                "image_load_error",
            )
        elif i == 0 and size != (0, 0):
            ratio = f"{size[0]}:{size[1]}"
    if "num_images" in body and not _int_in(body["num_images"], 1, 4):
        err("num_images", "Input should be between 1 and 4", "less_than_equal")
    if "output_format" in body and body["output_format"] not in ("jpeg", "png"):
        err("output_format", "Input should be 'jpeg' or 'png'", "literal_error")
    if "seed" in body and body["seed"] is not None and not _int_in(body["seed"], 0, 2**63):
        err("seed", "Input should be a valid integer", "int_type")
    if "guidance_scale" in body and not _number_in(body["guidance_scale"], 1, 20):
        err("guidance_scale", "Input should be between 1 and 20", "greater_than_equal")
    for name in ("sync_mode", "enhance_prompt", "enable_safety_checker"):
        if name in body and _bool(body[name]) is None:
            err(name, "Input should be a valid boolean", "bool_type")
    if "loras" in body:
        loras = body["loras"]
        if not isinstance(loras, list) or not all(
            isinstance(x, dict) and isinstance(x.get("path"), str) for x in loras
        ):
            err("loras", "Input should be a list of {path, scale}", "list_type")
    if kind == "dev":
        if "resolution_mode" in body and body["resolution_mode"] not in RESOLUTION_MODES:
            err("resolution_mode", f"Input should be one of {', '.join(RESOLUTION_MODES)}", "literal_error")
        if "acceleration" in body and body["acceleration"] not in ("none", "regular", "high"):
            err("acceleration", "Input should be 'none', 'regular' or 'high'", "literal_error")
        if "num_inference_steps" in body and not _int_in(body["num_inference_steps"], 1, 50):
            err("num_inference_steps", "Input should be between 1 and 50", "less_than_equal")
    else:
        if "aspect_ratio" in body and body["aspect_ratio"] not in RATIOS:
            err("aspect_ratio", f"Input should be one of {', '.join(RATIOS)}", "literal_error")
        # A string enum: pydantic does not coerce 2 to "2" for a Literal.
        if "safety_tolerance" in body and body["safety_tolerance"] not in TOLERANCES:
            err("safety_tolerance", "Input should be '1', '2', '3', '4', '5' or '6'", "literal_error")
    return errors, ratio


def _image_size(url: Any) -> tuple[int, int] | None:
    """(w, h) of a data URI's image, (0, 0) for an http(s) URL (not fetched), None when unusable."""
    if not isinstance(url, str):
        return None
    if url.startswith(("http://", "https://")):
        return (0, 0)
    if not url.startswith("data:") or "," not in url:
        return None
    try:
        data = base64.b64decode(url.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (binascii.Error, ValueError, OSError):
        return None


def _bool(value: Any) -> bool | None:
    """pydantic's lax bool: bools, 0/1 and the usual strings (multipart forms send strings)."""
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    return None


def _int_in(value: Any, lo: int, hi: int) -> bool:
    try:
        n = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except ValueError:
        return False
    return n is not None and lo <= n <= hi


def _number_in(value: Any, lo: float, hi: float) -> bool:
    try:
        x = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        return False
    return x is not None and lo <= x <= hi
