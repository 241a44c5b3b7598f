"""A fake Replicate predictions API for FLUX.1 Kontext.

    POST   /v1/models/{owner}/{name}/predictions  -> the prediction (201; finished with Prefer: wait)
    GET    {urls.get} = /v1/predictions/{id}      -> the prediction: starting, processing, then terminal
    POST   {urls.cancel}                          -> the prediction, canceled
    POST   /v1/files (multipart)                  -> a file object (201); its urls.get is an image input
    GET    /v1/files/{id}[/download], DELETE      -> the file object, its bytes; 204
    GET    /results/{name}                        -> an output image (expiring)

Faithful where the gateway depends on it: Bearer auth (401 body as Replicate sends it), `Prefer: wait`,
stateful predictions (`starting`, then `processing` for `pending_polls` polls, then `succeeded`),
absolute `urls.get` / `urls.cancel`, cancel, and outputs served as real images.

Strict, as the published contracts say: the body is checked against the model's route schema
(replicate.<owner>__<name>: closed, `input` included, so a field the model does not declare is refused,
e.g. prompt_upsampling on the multi-image apps; multi-image-kontext-max publishes no input, so it is
held to -pro's, the names clients send), then each image input must be an http(s) URL, a file's
`urls.get` from this fake's files API, or a data URL of at most 256 KB (256 x 1024 bytes of the file it
carries): the API reference documents data URLs for files up to 256 KB and HTTP URLs above, so a larger
one is refused. A refusal is a 422 in Replicate's problem-details shape (`title` "Input validation
failed", `detail` one "- field: why" line per problem, `status`, `invalid_fields`), kept in
`fake.refused`. Uploads are kept in `fake.uploads` (files must be smaller than `file_limit`, 100 MB: 413
otherwise), every body's size in `fake.received`.

Faults (tests/fakes/common.py): HTTP kinds at "submit" / "poll" / "upload" / "download"; "moderation"
ends the prediction `failed` with a documented moderation wording, chosen by `variant=` (MODERATION):
"e005" (the default, "... (E005)"), "e005_tagged" (with a "(uIJ6l3ruRD)" tag), "e005_prefixed" (inside
"Prediction failed: ... ModelError: ..."), "safety_system" ("The generated output was flagged as
potentially sensitive by the safety system.") or "dev_nsfw" ([dev]'s own checker: "Generated image
contained NSFW content. ...", the default on flux-kontext-dev, where `disable_safety_checker: true`
turns it off, as in the Cog predictor); "task_error" ends it `failed` with a model error;
"foreign_url" (at submit) puts `urls.get` / `urls.cancel` on `location`, another host.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import io
import json
import uuid
from fractions import Fraction
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kontext_gateway.providers import contracts
from kontext_gateway.providers.contracts import Problem

from .common import (
    Fault,
    Faults,
    Received,
    Refusal,
    ResultStore,
    Upload,
    conditional_bound,
    http_fault,
    record,
    subschema,
)

E005 = "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
MODERATION = {
    "e005": E005,
    "e005_tagged": f"{E005} (uIJ6l3ruRD)",
    "e005_prefixed": f"Prediction failed: Async prediction failed: ModelError: {E005} (uIJ6l3ruRD)",
    "safety_system": "The generated output was flagged as potentially sensitive by the safety system.",
    "dev_nsfw": "Generated image contained NSFW content. Try running it again with a different prompt.",
}
TASK_ERROR = "Prediction failed: CUDA error: an illegal memory access was encountered"
DATA_URL_LIMIT = 256 * 1024  # bytes of the file a data URL carries; above, an HTTP URL is needed
FILE_LIMIT = 100 * 1024 * 1024  # "Files must be less than 100MB in size"
FILE_TTL = dt.timedelta(hours=1)  # API files are deleted after an hour
IMAGE_FIELDS = ("input_image", "input_image_1", "input_image_2")
ERRORS = {
    401: ("Unauthenticated", "You did not pass a valid authentication token"),
    402: (
        "Insufficient credit",
        (
            "You have insufficient credit to run this model. Go to "
            "https://replicate.com/account/billing#billing to purchase credit."
        ),
    ),
    429: (None, "Request was throttled. Your rate limit resets in ~30s."),
    500: ("Internal Server Error", "Internal server error"),
    502: ("Bad Gateway", "Bad gateway"),
    503: ("Service Unavailable", "Service temporarily unavailable"),
}
# owner/name -> (the route schema it is held to, default output_format)
MODELS = {
    "black-forest-labs/flux-kontext-pro": ("replicate.black-forest-labs__flux-kontext-pro", "png"),
    "black-forest-labs/flux-kontext-max": ("replicate.black-forest-labs__flux-kontext-max", "png"),
    "black-forest-labs/flux-kontext-dev": ("replicate.black-forest-labs__flux-kontext-dev", "webp"),
    "flux-kontext-apps/multi-image-kontext-pro": ("replicate.flux-kontext-apps__multi-image-kontext-pro", "png"),
    # No published input: the -pro app's, whose field names every client sends.
    "flux-kontext-apps/multi-image-kontext-max": ("replicate.flux-kontext-apps__multi-image-kontext-pro", "png"),
}


def _now(delta: dt.timedelta = dt.timedelta()) -> str:
    return (dt.datetime.now(dt.UTC) + delta).isoformat().replace("+00:00", "Z")


def error_body(status: int, detail: str | None = None, **more: Any) -> dict[str, Any]:
    title, default = ERRORS.get(status, (None, "error"))
    body: dict[str, Any] = {"detail": detail or default, "status": status}
    if title:
        body["title"] = title
    return {**body, **more}


def problem(status: int, detail: str | None = None, **more: Any) -> JSONResponse:
    """Replicate's error answer: problem details (RFC 9457), as its OpenAPI has them for 404 and 413."""
    return JSONResponse(error_body(status, detail, **more), status, media_type="application/problem+json")


def decode_data_uri(value: str) -> Image.Image | None:
    """The image in a data URI, or None when it is not one that decodes."""
    data = data_uri_bytes(value)
    if data is None:
        return None
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except (OSError, ValueError):
        return None


def data_uri_bytes(value: str) -> bytes | None:
    """The file a base64 data URI carries, or None when it is not one."""
    if not value.startswith("data:") or "," not in value:
        return None
    try:
        return base64.b64decode(value.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        return None


def ratio_of(im: Image.Image) -> str:
    f = Fraction(im.width, im.height)
    return f"{f.numerator}:{f.denominator}"


class FakeReplicate:
    def __init__(self, *, token: str = "r8_test", pending_polls: int = 2, results: ResultStore | None = None) -> None:
        self.token = token
        self.pending_polls = pending_polls  # polls answered starting/processing before the end
        self._made = pending_polls
        self.results = results or ResultStore()
        self.file_limit = FILE_LIMIT
        self.faults = Faults()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []  # (method, path, headers, json)
        self.received: list[Received] = []
        self.refused: list[Refusal] = []
        self.uploads: list[Upload] = []  # files created through the files API, deleted ones included
        self.other_origins: list[str] = []  # one host: the files API lives beside the predictions
        self.files: dict[str, Upload] = {}  # id -> the live ones
        self.predictions: dict[str, dict[str, Any]] = {}
        self.canceled: list[str] = []  # ids whose cancel was requested
        self.app = Starlette(
            routes=[
                Route("/v1/models/{owner}/{name}/predictions", self.create, methods=["POST"]),
                Route("/v1/predictions/{id}", self.get, methods=["GET"]),
                Route("/v1/predictions/{id}/cancel", self.cancel, methods=["POST"]),
                Route("/v1/files", self.create_file, methods=["POST"]),
                Route("/v1/files/{id}", self.file, methods=["GET", "DELETE"]),
                Route("/v1/files/{id}/download", self.download_file, methods=["GET"]),
                Route("/results/{name}", self.result, methods=["GET"]),
            ]
        )

    # -- helpers ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        """As made: no faults, nothing logged or uploaded, `pending_polls` and `file_limit` back."""
        self.faults.clear()
        self.requests.clear()
        self.received.clear()
        self.refused.clear()
        self.uploads.clear()
        self.files.clear()
        self.canceled.clear()
        self.pending_polls, self.file_limit = self._made, FILE_LIMIT

    def submits(self) -> list[tuple[str, str, dict[str, str], Any]]:
        return [r for r in self.requests if r[0] == "POST" and r[1].endswith("/predictions")]

    async def _record(self, request: Request) -> Any:
        return await record(self.requests, request, received=self.received)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    @staticmethod
    def _error(status: int, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(status), status_code=status, headers=headers)

    async def _fault(self, point: str, request: Request) -> tuple[Response | None, Fault | None]:
        """(a response to send instead, or a fault for the prediction: "moderation" / "task_error" (its
        fate) or "foreign_url")."""
        fault = self.faults.take(point)
        if fault is None:
            return None, None
        if fault.kind in ("moderation", "task_error", "foreign_url"):
            return None, fault
        return await http_fault(fault, self._error, request), None

    @staticmethod
    def _view(p: dict[str, Any]) -> dict[str, Any]:
        # Timestamps not reached yet are left out: the contract types them as strings, not null.
        return {k: v for k, v in p.items() if not k.startswith("_") and not (k.endswith("_at") and v is None)}

    def _finish(self, p: dict[str, Any]) -> None:
        """Move a prediction to its terminal state, making its output when it succeeds."""
        p["completed_at"] = _now()
        p["started_at"] = p["started_at"] or p["created_at"]
        fate: Fault | None = p["_fate"]
        inputs = p["input"]
        if fate is not None and fate.kind == "moderation":
            variant = fate.variant or ("dev_nsfw" if p["model"].endswith("-dev") else "e005")
            # [dev]'s checker is the predictor's own: off when asked, and nothing is flagged.
            if not (variant == "dev_nsfw" and inputs.get("disable_safety_checker") is True):
                p.update(status="failed", error=MODERATION[variant])
                return
        if fate is not None and fate.kind == "task_error":
            p.update(status="failed", error=TASK_ERROR)
            return
        ratio = inputs.get("aspect_ratio", "match_input_image")
        if ratio == "match_input_image":
            source = inputs.get("input_image") or inputs.get("input_image_1") or ""
            im = self._image(source)
            ratio = ratio_of(im) if im is not None else "1:1"
        fmt = inputs.get("output_format", p["_default_format"])
        url, _ = self.results.image_url(p["_base"], ratio, fmt, seed=int(inputs.get("seed") or 0))
        p.update(status="succeeded", output=url, metrics={"predict_time": 0.01, "total_time": 0.02})

    def _image(self, value: str) -> Image.Image | None:
        """An image input as a picture: a data URL's, or an uploaded file's (an http URL is not fetched)."""
        upload = self._file_at(value)
        data = upload.data if upload is not None else data_uri_bytes(value)
        if data is None:
            return None
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
            return im
        except (OSError, ValueError):
            return None

    def _file_at(self, url: str) -> Upload | None:
        return next((f for f in self.files.values() if f.url == url), None)

    # -- validation ------------------------------------------------------------------------------------

    def _invalid(self, key: str, body: Any) -> list[dict[str, str]]:
        """Replicate's `invalid_fields` for a prediction body: the route schema's problems, then the image
        inputs' (what they must be beyond a string)."""
        problems = contracts.request_problems(key, body)
        fields = [_invalid_field(p, contracts.route_schema(key)) for p in problems]
        inputs = body.get("input") if isinstance(body, dict) else None
        if not isinstance(inputs, dict):
            return fields
        flagged = {p.path[1] for p in problems if len(p.path) > 1 and p.path[0] == "input"}
        for name in IMAGE_FIELDS:
            value = inputs.get(name)
            if name in flagged or not isinstance(value, str):
                continue
            why = self._image_problem(value)
            if why is not None:
                fields.append({"type": "format", "field": f"input.{name}", "description": why})
        return fields

    def _image_problem(self, value: str) -> str | None:
        if value.startswith("data:"):
            data = data_uri_bytes(value)
            if data is None or decode_data_uri(value) is None:
                return "Does not match format 'uri': not a data URL of an image"
            if len(data) > DATA_URL_LIMIT:
                return (
                    f"a data URL carries {len(data)} bytes: data URLs are for files up to 256 KB; "
                    "pass a larger file as an HTTP URL (the files API gives one)"
                )
            return None
        if "/v1/files/" in value and self._file_at(value) is None:
            return "File not found"  # one of this API's file URLs, deleted or never made
        if not value.startswith(("http://", "https://")):
            return "Does not match format 'uri'"
        return None

    # -- predictions -----------------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        replacement, fault = await self._fault("submit", request)
        if replacement is not None:
            return replacement
        fate = fault if fault is not None and fault.kind != "foreign_url" else None
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        if model not in MODELS:
            return problem(404, "The requested resource could not be found.", title="Not found")
        key, default_format = MODELS[model]
        invalid = self._invalid(key, body)
        if invalid:
            lines = [f"{p['field']}: {p['description']}" for p in invalid]
            self.refused.append(Refusal(key, 422, lines))
            detail = "".join(f"- {line}\n" for line in lines)
            return problem(422, detail, title="Input validation failed", invalid_fields=invalid)
        pid = uuid.uuid4().hex[:26]
        base = str(request.base_url).rstrip("/")
        api = fault.location if fault is not None and fault.kind == "foreign_url" and fault.location else base
        p: dict[str, Any] = {
            "id": pid,
            "model": model,
            "version": "hidden",
            "input": body["input"],
            "logs": "",
            "output": None,
            "data_removed": False,
            "error": None,
            "status": "starting",
            "source": "api",
            "created_at": _now(),
            "started_at": None,
            "completed_at": None,
            "urls": {
                "get": f"{api}/v1/predictions/{pid}",
                "cancel": f"{api}/v1/predictions/{pid}/cancel",
                "stream": f"{api}/v1/predictions/{pid}/stream",
                "web": f"https://replicate.com/p/{pid}",
            },
            "metrics": {},
            "_fate": fate,
            "_polls_left": 0 if fate else self.pending_polls,
            "_base": base,
            "_default_format": default_format,
        }
        self.predictions[pid] = p
        # Prefer: wait holds the request until the prediction is done; this fake's predictions take
        # `pending_polls` polls, so only one that is done at once comes back finished.
        if request.headers.get("prefer", "").startswith("wait") and p["_polls_left"] == 0:
            self._finish(p)
        return JSONResponse(self._view(p), status_code=201)

    async def get(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        replacement, fault = await self._fault("poll", request)
        if replacement is not None:
            return replacement
        fate = fault if fault is not None and fault.kind != "foreign_url" else None
        p = self.predictions.get(request.path_params["id"])
        if p is None:
            return problem(404, "Not found.")
        if p["status"] in ("starting", "processing"):
            if fate:
                p["_fate"], p["_polls_left"] = fate, 0
            if p["_polls_left"] > 0:
                p["_polls_left"] -= 1
                p.update(status="processing", started_at=p["started_at"] or _now())
            else:
                self._finish(p)
        return JSONResponse(self._view(p))

    async def cancel(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        p = self.predictions.get(request.path_params["id"])
        if p is None:
            return problem(404, "Not found.")
        self.canceled.append(p["id"])
        if p["status"] in ("starting", "processing"):
            p.update(status="canceled", completed_at=_now())
        return JSONResponse(self._view(p))

    async def result(self, request: Request) -> Response:
        await self._record(request)
        return await self.results.serve(request, self.faults)

    # -- files -----------------------------------------------------------------------------------------

    async def create_file(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        replacement, _ = await self._fault("upload", request)
        if replacement is not None:
            return replacement
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return self._refuse_file("content: a multipart/form-data body is required")
        async with request.form() as form:
            content = form.get("content")
            if not isinstance(content, UploadFile):
                return self._refuse_file("content: required, a file part")
            data = await content.read()
            filename = form.get("filename") or content.filename or "file"
            ctype = form.get("type") or content.content_type or "application/octet-stream"
            raw_metadata = form.get("metadata")
        if len(data) >= self.file_limit:
            return problem(413, "Files must be less than 100MB in size")
        if not isinstance(filename, str) or len(filename.encode()) > 255:
            return self._refuse_file("filename: at most 255 bytes of UTF-8")
        try:
            metadata = json.loads(raw_metadata) if isinstance(raw_metadata, str) else {}
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            return self._refuse_file("metadata: must be a JSON object")
        fid = uuid.uuid4().hex[:26]
        upload = Upload(
            fid,
            filename,
            str(ctype),
            f"{str(request.base_url).rstrip('/')}/v1/files/{fid}",
            data,
            metadata=metadata,
            headers=dict(request.headers),
        )
        self.files[fid] = upload
        self.uploads.append(upload)
        return JSONResponse(self._file_object(upload), status_code=201)

    def _refuse_file(self, why: str) -> Response:
        self.refused.append(Refusal("replicate.files", 422, [why]))
        return problem(422, why, title="Invalid request")

    @staticmethod
    def _file_object(upload: Upload) -> dict[str, Any]:
        return {
            "id": upload.id,
            "content_type": upload.content_type,
            "size": upload.size,
            "checksums": {"sha256": hashlib.sha256(upload.data).hexdigest()},
            "metadata": upload.metadata,
            "created_at": _now(),
            "expires_at": _now(FILE_TTL),
            "urls": {"get": upload.url},
        }

    async def file(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        upload = self.files.get(request.path_params["id"])
        if upload is None:
            return problem(404, "File not found")
        if request.method == "DELETE":
            del self.files[upload.id]
            return Response(status_code=204)
        return JSONResponse(self._file_object(upload))

    async def download_file(self, request: Request) -> Response:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        upload = self.files.get(request.path_params["id"])
        if upload is None:
            return problem(404, "File not found")
        return Response(upload.data, media_type=upload.content_type)


def _invalid_field(p: Problem, schema: dict[str, Any]) -> dict[str, str]:
    """One of Replicate's `invalid_fields` ({type, field, description}), worded as its validator words it."""
    name = str(p.path[-1]) if p.path else "input"
    parent = ".".join(str(x) for x in p.path[:-1]) or "(root)"
    field = ".".join(str(x) for x in p.path) or "(root)"
    if p.keyword == "required":
        return {"type": "required", "field": parent, "description": f"{name} is required"}
    if p.keyword == "additionalProperties":
        return {
            "type": "additional_property_not_allowed",
            "field": parent,
            "description": f"Additional property {name} is not allowed",
        }
    rule = subschema(schema, p.path)
    if p.keyword == "enum":
        allowed = ", ".join(json.dumps(v) for v in rule.get("enum", []))
        return {"type": "enum", "field": field, "description": f"{name} must be one of the following: {allowed}"}
    if p.keyword in ("minimum", "maximum"):
        # A conditional cap is the then-branch's; the property's description says when it holds.
        bound = conditional_bound(schema, p) if p.conditional else rule.get(p.keyword)
        words = "greater than or equal to" if p.keyword == "minimum" else "less than or equal to"
        why = f"Must be {words} {bound}"
        if p.conditional and rule.get("description"):
            why += f" ({rule['description']})"
        return {"type": "number_" + ("gte" if p.keyword == "minimum" else "lte"), "field": field, "description": why}
    return {"type": "invalid_type" if p.keyword == "type" else p.keyword, "field": field, "description": p.message}
