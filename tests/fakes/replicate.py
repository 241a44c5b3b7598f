"""A fake Replicate predictions API for FLUX.1 Kontext.

Faithful where the gateway depends on it: Bearer auth (401 body as Replicate sends it), per-model input
validation (422 `Input validation failed` with `detail`), `Prefer: wait`, stateful predictions
(`starting`, then `processing` for `pending_polls` polls, then `succeeded`), absolute `urls.get` /
`urls.cancel`, cancel, and outputs served as real images from expiring URLs on the fake itself.

Faults (tests/fakes/common.py): HTTP kinds at "submit" / "poll" / "download"; "moderation" ends the
prediction `failed` with the E005 error; "task_error" ends it `failed` with a model error;
"foreign_url" (at submit) puts `urls.get` / `urls.cancel` on `location`, another host.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import io
import uuid
from fractions import Fraction
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .common import Fault, Faults, ResultStore, http_fault, record

RATIOS = [
    "match_input_image",
    "1:1",
    "16:9",
    "9:16",
    "4:3",
    "3:4",
    "3:2",
    "2:3",
    "4:5",
    "5:4",
    "21:9",
    "9:21",
    "2:1",
    "1:2",
]
E005 = "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
TASK_ERROR = "Prediction failed: CUDA error: an illegal memory access was encountered"
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

# Input schemas, one per model: field -> (JSON type, enum or (min, max) or None). Required fields apart.
_PRO = {
    "prompt": ("string", None),
    "input_image": ("uri", None),
    "aspect_ratio": ("string", RATIOS),
    "output_format": ("string", ["jpg", "png"]),
    "seed": ("integer", None),
    "safety_tolerance": ("integer", (0, 6)),
    "prompt_upsampling": ("boolean", None),
}
_MULTI = {
    "prompt": ("string", None),
    "input_image_1": ("uri", None),
    "input_image_2": ("uri", None),
    "aspect_ratio": ("string", RATIOS),
    "output_format": ("string", ["jpg", "png"]),
    "seed": ("integer", None),
    "safety_tolerance": ("integer", (0, 2)),
}
_DEV = {
    "prompt": ("string", None),
    "input_image": ("uri", None),
    "aspect_ratio": ("string", RATIOS),
    "num_inference_steps": ("integer", (4, 50)),
    "guidance": ("number", (0, 10)),
    "seed": ("integer", None),
    "output_format": ("string", ["webp", "jpg", "png"]),
    "output_quality": ("integer", (0, 100)),
    "disable_safety_checker": ("boolean", None),
    "go_fast": ("boolean", None),
}
MODELS: dict[str, tuple[dict[str, tuple[str, Any]], tuple[str, ...], str]] = {
    # owner/name -> (schema, required fields, default output_format)
    "black-forest-labs/flux-kontext-pro": (_PRO, ("prompt",), "png"),
    "black-forest-labs/flux-kontext-max": (_PRO, ("prompt",), "png"),
    "black-forest-labs/flux-kontext-dev": (_DEV, ("prompt", "input_image"), "webp"),
    "flux-kontext-apps/multi-image-kontext-pro": (_MULTI, ("prompt", "input_image_1", "input_image_2"), "png"),
    "flux-kontext-apps/multi-image-kontext-max": (_MULTI, ("prompt", "input_image_1", "input_image_2"), "png"),
}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def error_body(status: int, detail: str | None = None, **more: Any) -> dict[str, Any]:
    title, default = ERRORS.get(status, (None, "error"))
    body: dict[str, Any] = {"detail": detail or default, "status": status}
    if title:
        body["title"] = title
    return {**body, **more}


def decode_data_uri(value: str) -> Image.Image | None:
    """The image in a data URI, or None when it is not one that decodes."""
    if not value.startswith("data:") or "," not in value:
        return None
    try:
        im = Image.open(io.BytesIO(base64.b64decode(value.split(",", 1)[1], validate=True)))
        im.load()
        return im
    except (binascii.Error, OSError, ValueError):
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
        self.faults = Faults()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []  # (method, path, headers, json)
        self.predictions: dict[str, dict[str, Any]] = {}
        self.canceled: list[str] = []  # ids whose cancel was requested
        self.app = Starlette(
            routes=[
                Route("/v1/models/{owner}/{name}/predictions", self.create, methods=["POST"]),
                Route("/v1/predictions/{id}", self.get, methods=["GET"]),
                Route("/v1/predictions/{id}/cancel", self.cancel, methods=["POST"]),
                Route("/results/{name}", self.result, methods=["GET"]),
            ]
        )

    # -- helpers ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        """As made: no faults, nothing logged, `pending_polls` back where it was."""
        self.faults.clear()
        self.requests.clear()
        self.canceled.clear()
        self.pending_polls = self._made

    def submits(self) -> list[tuple[str, str, dict[str, str], Any]]:
        return [r for r in self.requests if r[0] == "POST" and r[1].endswith("/predictions")]

    async def _record(self, request: Request) -> Any:
        return await record(self.requests, request)

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

    def _view(self, p: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in p.items() if not k.startswith("_")}

    def _finish(self, p: dict[str, Any]) -> None:
        """Move a prediction to its terminal state, making its output when it succeeds."""
        p["completed_at"] = _now()
        p["started_at"] = p["started_at"] or p["created_at"]
        fate = p["_fate"]
        if fate == "moderation":
            p.update(status="failed", error=E005)
            return
        if fate == "task_error":
            p.update(status="failed", error=TASK_ERROR)
            return
        inputs = p["input"]
        ratio = inputs.get("aspect_ratio", "match_input_image")
        if ratio == "match_input_image":
            source = inputs.get("input_image") or inputs.get("input_image_1") or ""
            im = decode_data_uri(source)
            ratio = ratio_of(im) if im is not None else "1:1"
        fmt = inputs.get("output_format", p["_default_format"])
        url, _ = self.results.image_url(p["_base"], ratio, fmt, seed=int(inputs.get("seed") or 0))
        p.update(status="succeeded", output=url, metrics={"predict_time": 0.01})

    # -- validation ------------------------------------------------------------------------------------

    @staticmethod
    def _invalid(model: str, inputs: Any) -> list[dict[str, str]]:
        schema, required, _ = MODELS[model]
        if not isinstance(inputs, dict):
            return [{"type": "invalid_type", "field": "input", "description": "input must be an object"}]
        problems = [
            {"type": "required", "field": "input", "description": f"{f} is required"}
            for f in required
            if f not in inputs
        ]
        for field, value in inputs.items():
            if field not in schema:
                continue  # Replicate ignores inputs the model does not declare
            kind, rule = schema[field]
            ok = {
                "string": isinstance(value, str),
                "uri": isinstance(value, str)
                and (decode_data_uri(value) is not None or value.startswith(("http://", "https://"))),
                "integer": isinstance(value, int) and not isinstance(value, bool),
                "number": isinstance(value, (int, float)) and not isinstance(value, bool),
                "boolean": isinstance(value, bool),
            }[kind]
            if not ok:
                problems.append(
                    {
                        "type": "invalid_type",
                        "field": f"input.{field}",
                        "description": f"Invalid type. Expected: {kind}, given: {type(value).__name__}",
                    }
                )
            elif isinstance(rule, list) and value not in rule:
                allowed = ", ".join(f'"{r}"' for r in rule)
                problems.append(
                    {
                        "type": "enum",
                        "field": f"input.{field}",
                        "description": f"{field} must be one of the following: {allowed}",
                    }
                )
            elif isinstance(rule, tuple) and not rule[0] <= value <= rule[1]:
                problems.append(
                    {
                        "type": "number_range",
                        "field": f"input.{field}",
                        "description": f"{field} must be between {rule[0]} and {rule[1]}",
                    }
                )
        if (
            schema is _PRO
            and "input_image" in inputs
            and isinstance(inputs.get("safety_tolerance"), int)
            and inputs["safety_tolerance"] > 2
        ):
            problems.append(
                {
                    "type": "number_range",
                    "field": "input.safety_tolerance",
                    "description": "2 is currently the maximum allowed when input images are used",
                }
            )
        return problems

    # -- routes ----------------------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        body = await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        replacement, fault = await self._fault("submit", request)
        if replacement is not None:
            return replacement
        fate = fault.kind if fault is not None and fault.kind != "foreign_url" else None
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        if model not in MODELS:
            return JSONResponse(
                error_body(404, "The requested resource could not be found.", title="Not found"), status_code=404
            )
        if not isinstance(body, dict) or "input" not in body:
            return JSONResponse(
                error_body(422, "- input: input is required\n", title="Input validation failed"), status_code=422
            )
        problems = self._invalid(model, body["input"])
        if problems:
            detail = "".join(f"- {p['field']}: {p['description']}\n" for p in problems)
            return JSONResponse(
                error_body(422, detail, title="Input validation failed", invalid_fields=problems), status_code=422
            )
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
            "_default_format": MODELS[model][2],
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
        fate = fault.kind if fault is not None and fault.kind != "foreign_url" else None
        p = self.predictions.get(request.path_params["id"])
        if p is None:
            return JSONResponse(error_body(404, "Not found."), status_code=404)
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
            return JSONResponse(error_body(404, "Not found."), status_code=404)
        self.canceled.append(p["id"])
        if p["status"] in ("starting", "processing"):
            p.update(status="canceled", completed_at=_now())
        return JSONResponse(self._view(p))

    async def result(self, request: Request) -> Response:
        await self._record(request)
        return await self.results.serve(request, self.faults)
