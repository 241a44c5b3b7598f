"""A fake fal.ai queue API for the Kontext routes, with fal's storage upload.

    POST /{model route}                      -> {request_id, response_url, status_url, cancel_url, queue_position}
    GET  /{app}/requests/{id}/status          -> IN_QUEUE, IN_PROGRESS (for `pending_polls` polls), COMPLETED
    GET  /{app}/requests/{id}                 -> {images, seed, has_nsfw_concepts, prompt, timings} or the error
    PUT  /{app}/requests/{id}/cancel          -> 202 CANCELLATION_REQUESTED | 400 ALREADY_COMPLETED | 404
    GET  /results/{name}                      -> the image (expiring)

`{app}` is the first two segments of the route (`fal-ai/flux-pro`), as on fal: the status, response
and cancel URLs drop the route's subpath, so only a client using the returned URLs finds them.
Auth is `Authorization: Key <key>`. The queue accepts any input; like fal's apps, the fake then checks
it at the response URL, after COMPLETED: against the route's published schema (closed, so a field the
route lacks, e.g. enhance_prompt or safety_tolerance on [dev], is refused; safety_tolerance is a string
on pro/max), then each image must be an http(s) URL or a data URI that loads. A refusal is the 422
`{"detail": [{"loc", "msg", "type", "url"}]}` fal answers, kept in `fake.refused` when the body arrives.

Storage, as fal-js uploads (two more hosts, `Annex`es on other loopback hosts and ports):

    POST {fake.storage_url}/storage/upload/initiate?storage_type=fal-cdn-v3  {content_type, file_name}
         -> {upload_url, file_url}                     (the REST host, like rest.fal.ai: takes the key)
    PUT  {upload_url}  the bytes                       (a signed URL on the CDN host: no key needed)
    GET  {file_url}    the bytes                       (the CDN host, like v3.fal.media)

A `file_url` is a valid image input once its bytes were PUT (before, the image fails to load). Uploads
are kept in `fake.uploads` (with the headers the PUT carried: never the key), both storage hosts'
requests in `fake.storage_requests`, every body's size in `fake.received`. `fake.other_origins` is the
REST host, for the gateway's `provider_hosts`; the CDN host is not one of fal's key hosts. HTTP faults
at "upload" answer the initiate call.

Provider fault kinds: "moderation", `variant=` "content_policy" (the response URL answers 422
`type: content_policy_violation`, msg "The content was flagged by a content checker.", `categories`:
`reasons=`, ["sexual"] by default; what pro/max do) or "nsfw_concepts" (the result says
`has_nsfw_concepts: [true, ...]`; what [dev] / lora do, unless `enable_safety_checker` is false), each
route's own by default; "task_error" (the response URL answers 500 with an infrastructure error body)
and "foreign_url" (at submit: the status, response and cancel URLs name `location`, another host).
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kontext_gateway.providers import contracts

from .common import (
    Annex,
    Fault,
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
MODERATION_MSG = "The content was flagged by a content checker."
ERRORS_URL = "https://docs.fal.ai/errors"
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
    moderated: Fault | None = None  # the "moderation" fault that flags it
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
        self.storage_requests: list[tuple[str, str, dict[str, str], Any]] = []  # the REST and CDN hosts'
        self.received: list[Received] = []
        self.refused: list[Refusal] = []
        self.uploads: list[Upload] = []
        self.tasks: dict[str, FalTask] = {}
        self.rest = Annex(Starlette(routes=[Route("/storage/upload/initiate", self._initiate, methods=["POST"])]))
        self.cdn = Annex(
            Starlette(
                routes=[
                    Route("/upload/{token}", self._upload, methods=["PUT"]),
                    Route("/files/{token}/{name}", self._file, methods=["GET"]),
                ]
            )
        )
        self.app = Starlette(
            routes=[
                Route("/results/{name}", self._download, methods=["GET"]),
                Route("/{owner}/{app}/requests/{rid}/status", self._status, methods=["GET"]),
                Route("/{owner}/{app}/requests/{rid}/cancel", self._cancel, methods=["PUT"]),
                Route("/{owner}/{app}/requests/{rid}", self._response, methods=["GET"]),
                Route("/{route:path}", self._submit, methods=["POST"]),
            ],
            lifespan=annexes(self.rest, self.cdn),
        )

    @property
    def storage_url(self) -> str | None:
        """The storage REST host's base URL (rest.fal.ai's part), while the fake runs."""
        return self.rest.url

    @property
    def other_origins(self) -> list[str]:
        """Origins besides its own that take the key: the storage REST host (not the CDN's)."""
        return [self.rest.url] if self.rest.url else []

    def reset(self) -> None:
        """As made: no faults, nothing logged or uploaded, `pending_polls` back where it was."""
        self.faults.clear()
        self.requests.clear()
        self.storage_requests.clear()
        self.received.clear()
        self.refused.clear()
        self.uploads.clear()
        self.pending_polls = self._made

    def submits(self) -> list[tuple[str, dict[str, Any]]]:
        """(path, body) of every submit received."""
        return [(path, body) for method, path, _, body in self.requests if method == "POST"]

    async def _record(self, request: Request) -> Any:
        return await record(self.requests, request, received=self.received)

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
            task.moderated = flag if flag.kind == "moderation" else task.moderated
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
        # The queue takes any object: a validation error surfaces at the response URL once COMPLETED.
        key = contracts.request_key("fal", route)
        assert key is not None, route  # every route the fake serves has a published schema
        errors, input_ratio = validate(key, body, self._stored)
        if errors:
            self.refused.append(Refusal(key, 422, detail_lines(errors)))
        task = FalTask(
            uuid.uuid4().hex,
            "/".join(route.split("/")[:2]),
            route,
            kind,
            body,
            input_ratio,
            errors,
            moderated=flag if flag is not None and flag.kind == "moderation" else None,
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
            return JSONResponse({"detail": task.errors}, status_code=422, headers={"x-fal-retryable": "false"})
        if task.failed:
            return JSONResponse(
                {"detail": "Unexpected error while running the model", "error_type": "internal_server_error"},
                status_code=500,
                headers={"x-fal-error-type": "internal_server_error"},
            )
        if self._variant(task) == "content_policy":
            # pro/max forward BFL's moderation as a 422 content_policy_violation.
            assert task.moderated is not None
            return JSONResponse(
                {
                    "detail": [
                        {
                            "loc": ["body", "prompt"],
                            "msg": MODERATION_MSG,
                            "type": "content_policy_violation",
                            "url": f"{ERRORS_URL}#content_policy_violation",
                            "ctx": {},
                            "input": task.body.get("prompt"),
                            "categories": task.moderated.reasons or ["sexual"],
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

    @staticmethod
    def _variant(task: FalTask) -> str | None:
        """Which moderation signal a flagged task gives, or None (not flagged, or the checker is off)."""
        if task.moderated is None:
            return None
        variant = task.moderated.variant or ("nsfw_concepts" if task.kind == "dev" else "content_policy")
        if variant == "nsfw_concepts" and task.body.get("enable_safety_checker") is False:
            return None
        return variant

    # -- storage: fal-js's upload ------------------------------------------------------------------------

    def _stored(self, url: str) -> Upload | None:
        """The upload a file_url names, if it is one of this fake's."""
        return next((u for u in self.uploads if u.url == url), None)

    async def _initiate(self, request: Request) -> Response:
        body = await record(self.storage_requests, request, with_query=True, received=self.received)
        if not self._authorized(request):
            return self._error(401)
        replacement, _ = await self._fault("upload", request)
        if replacement is not None:
            return replacement
        problems = [
            {"loc": ["body", name], "msg": "Field required", "type": "missing"}
            for name in ("content_type", "file_name")
            if not isinstance(body, dict) or not isinstance(body.get(name), str)
        ]
        if problems:
            self.refused.append(Refusal("fal.storage.upload.initiate", 422, detail_lines(problems)))
            return JSONResponse({"detail": problems}, status_code=422)
        token = uuid.uuid4().hex
        cdn = self.cdn.url or str(request.base_url).rstrip("/")
        name = body["file_name"].rsplit("/", 1)[-1] or "file"
        upload = Upload(token, body["file_name"], body["content_type"], f"{cdn}/files/{token}/{name}", uploaded=False)
        self.uploads.append(upload)
        return JSONResponse({"upload_url": f"{cdn}/upload/{token}?signature=fake", "file_url": upload.url})

    async def _upload(self, request: Request) -> Response:
        """The PUT to a signed upload URL: its signature is the credential, no key is wanted."""
        await record(self.storage_requests, request, with_query=True, received=self.received)
        upload = next((u for u in self.uploads if u.id == request.path_params["token"]), None)
        if upload is None or request.query_params.get("signature") != "fake":
            return Response(b"<Error><Code>AccessDenied</Code></Error>", status_code=403, media_type="application/xml")
        upload.data, upload.uploaded, upload.headers = await request.body(), True, dict(request.headers)
        return Response(status_code=200)

    async def _file(self, request: Request) -> Response:
        await record(self.storage_requests, request, received=self.received)
        upload = next((u for u in self.uploads if u.id == request.path_params["token"]), None)
        if upload is None or not upload.uploaded:
            return Response(b"Not Found", status_code=404)
        return Response(upload.data, media_type=upload.content_type)

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
            if body.get("sync_mode") is True:  # a data URI, kept out of the request history
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
            "has_nsfw_concepts": [self._variant(task) == "nsfw_concepts"] * len(images),
            "timings": {"inference": 1.7},
        }


# -- validation: the published schema, then what fal's apps check beyond it ------------------------------


def validate(
    key: str, body: Any, stored: Callable[[str], Upload | None] | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """422 detail items for what fal would reject, and the first input image's ratio ("W:H").
    `stored(url)`: the fake's upload a file_url names, if any."""
    problems = contracts.request_problems(key, body)
    errors = [
        {**item, "url": f"{ERRORS_URL}#{item['type']}"}
        for item in pydantic_detail(problems, contracts.route_schema(key))
    ]
    if not isinstance(body, dict):
        return errors, None
    flagged = {p.path[0] for p in problems if p.path}
    images: list[tuple[list[str | int], Any]] = []
    if "image_url" in body and "image_url" not in flagged:
        images = [(["image_url"], body["image_url"])]
    elif isinstance(body.get("image_urls"), list) and "image_urls" not in flagged:
        images = [(["image_urls", i], url) for i, url in enumerate(body["image_urls"])]
    ratio = None
    for i, (loc, url) in enumerate(images):
        size = _image_size(url, stored)
        if size is None:
            errors.append(
                {
                    "loc": ["body", *loc],
                    "msg": "Failed to load the image. Please ensure the image file is not corrupted and is in a "
                    "supported format.",
                    "type": "image_load_error",
                    "url": f"{ERRORS_URL}#image_load_error",
                }
            )
        elif i == 0 and size != (0, 0):
            ratio = f"{size[0]}:{size[1]}"
    return errors, ratio


def _image_size(url: Any, stored: Callable[[str], Upload | None] | None = None) -> tuple[int, int] | None:
    """(w, h) of a data URI's or an uploaded file's image, (0, 0) for another http(s) URL (not fetched),
    None when unusable (a file_url whose bytes never arrived included)."""
    if not isinstance(url, str):
        return None
    upload = stored(url) if stored is not None else None
    if upload is not None:
        data = upload.data if upload.uploaded else b""
    elif url.startswith(("http://", "https://")):
        return (0, 0)
    elif not url.startswith("data:") or "," not in url:
        return None
    else:
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=True)
        except (binascii.Error, ValueError):
            return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (ValueError, OSError):
        return None
