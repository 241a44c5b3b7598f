"""What /openapi.json says about each route: its request body, its responses, its errors.

The routes read their bodies themselves (one parser for JSON and multipart, every error in the
OpenAI envelope), so FastAPI sees no body to document and guesses a 422 that never comes. The
route decorators say instead, with the pieces built here:

- `body(...)` goes into `openapi_extra`: the request body (JSON, multipart or both) and the
  query parameters and headers the handler reads itself (`dryRun`, `Idempotency-Key`, ...);
- `responses(...)` goes into `responses=`: the success body, and one entry per error status the
  route really answers, each with the envelope `ErrorResponse` as its schema;
- `build(app)` replaces `app.openapi`: FastAPI's document, plus the request models as components,
  the bearer scheme on /v1 and, on every route, the 400 for an untrusted Host (api/trusted.py);
  without FastAPI's "422 Validation Error" (validation errors are 400s, see api/errors.py). A 422
  stays only where the app answers one itself, in the envelope: the predictions API's webhook errors
  (as Replicate's) and an Idempotency-Key reused for a different request.

The models below document; they validate nothing. The handlers, protocol.py and keys.py do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from ..keys import MAX_BUDGET_USD, MAX_LIMIT, MAX_NAME_CHARS
from ..protocol import WEBHOOK_EVENTS as EVENTS
from ..protocol import ImageRequest
from ..store.ledger import PERIODS

COMPONENTS = "#/components/schemas/"

# -- the error envelope ---------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str = Field(min_length=1, description="What went wrong, for a person to act on.")
    type: str = Field(description="`invalid_request_error`, `server_error`, `permission_error`, ...")
    param: str | None = Field(description="The parameter at fault, when there is one.")
    code: str | None = Field(description="A machine-readable code, e.g. `invalid_value`, `model_not_found`.")


class ErrorResponse(BaseModel):
    """The OpenAI error envelope. The Replicate-style routes (/v1/predictions, /v1/files) add RFC 7807's
    `title`, `detail` and `status` beside `error`."""

    error: ErrorDetail


# Why a route answers each status; the same words on every route.
ERRORS: dict[int, str] = {
    400: "The request is malformed, a value is invalid or out of range, or the Host is not one this gateway "
    "answers to.",
    401: "No API key, or an unknown or revoked one (once the gateway is keyed).",
    402: "The API key's budget cannot cover the request.",
    403: "Not allowed: a model the API key may not use, an admin route without an admin key, a change sent "
    "from another site's page, or an altered or expired image link.",
    404: "Nothing by that id or name (another key's things are not found either: their existence is not disclosed).",
    409: "A conflict: the Idempotency-Key is being claimed at the same moment, or the request still runs.",
    413: "The body, or a file in it, is over its size limit.",
    415: "The body is not of a content type the route takes.",
    422: "Replicate's status for a bad webhook; and an Idempotency-Key reused with a different request.",
    429: "A rate limit (requests or images per minute, requests at once); `retry-after` says when to retry.",
    499: "The client hung up, or the request was canceled, before it finished.",
    500: "The local engine failed while generating.",
    502: "Every provider that could serve the request failed.",
    503: "No provider can serve the request (none configured or available); or the server stopped before the "
    "image was ready (`server_shutting_down`: the job goes on in the queue, `x-request-id` names it).",
    504: "The request ran out of time at the provider.",
}

# Every route: a bad Host (400) and, under /v1, a missing or bad key (401). Changes: another site's page (403).
READ = (400, 401)
WRITE = (400, 401, 403)
# The routes that create images: every way a request is refused, or fails on its way to a provider.
GENERATE = (*WRITE, 402, 404, 409, 413, 415, 422, 429, 499, 500, 502, 503, 504)
# A prediction is created before it runs: its failures are in the prediction, not the status.
PREDICT = (*WRITE, 402, 404, 409, 413, 415, 422, 429, 503)


def responses(
    *errors: int, ok: type[BaseModel] | dict[str, Any] | None = None, status: int = 200, description: str = "Success"
) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=`: `ok` (a model, or a schema) for `status`, and the envelope for each of
    `errors`."""
    out: dict[int | str, dict[str, Any]] = {}
    if isinstance(ok, dict):
        out[status] = {"description": description, "content": {"application/json": {"schema": ok}}}
    elif ok is not None:
        out[status] = {"description": description, "model": ok}
    for code in sorted(set(errors)):
        out[code] = {"model": ErrorResponse, "description": ERRORS[code]}
    return out


# -- what the handlers read themselves ---------------------------------------------------------

_MODELS: dict[str, type[BaseModel]] = {}


def ref(model: type[BaseModel]) -> dict[str, str]:
    """A `$ref` to `model` under components; `build` puts it there."""
    _MODELS[model.__name__] = model
    return {"$ref": COMPONENTS + model.__name__}


DRY_RUN = {
    "name": "dryRun",
    "in": "query",
    "required": False,
    "description": "Validate and price the request without running it (`dry_run` too).",
    "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "A retry with the same key and body joins the first request (24 h).",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}
PROVIDER = {
    "name": "x-provider",
    "in": "header",
    "required": False,
    "description": "Run on this provider only (`local`, `replicate`, ... or a config key), no failover.",
    "schema": {"type": "string"},
}
PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "`wait` holds the response until the prediction ends, up to 60 s; `wait=N` up to N s.",
    "schema": {"type": "string", "pattern": r"^\s*wait(\s*=\s*([1-9]|[1-5][0-9]|60))?\s*$"},
}


def body(
    *,
    json: type[BaseModel] | None = None,
    multipart: dict[str, Any] | None = None,
    required: bool = True,
    parameters: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    """The `openapi_extra` of a route that reads its body itself: a JSON model, a multipart schema, or
    both (the handler picks by Content-Type); `parameters` are the query parameters and headers it
    reads from the request (FastAPI adds its own path parameters)."""
    content: dict[str, Any] = {}
    if json is not None:
        content["application/json"] = {"schema": ref(json)}
    if multipart is not None:
        content["multipart/form-data"] = multipart
    extra: dict[str, Any] = {"requestBody": {"required": required, "content": content}}
    if parameters:
        extra["parameters"] = [copy.deepcopy(p) for p in parameters]
    return extra


# -- request bodies --------------------------------------------------------------------------------

_BINARY = {"type": "string", "format": "binary"}
# JSON-only fields of ImageRequest: a form field is a string, and these are lists of objects.
_JSON_ONLY = ("images", "loras")


def edit_form() -> dict[str, Any]:
    """The multipart form of /v1/images/edits: ImageRequest's fields as form fields, plus the files."""
    schema = ImageRequest.model_json_schema(ref_template=COMPONENTS + "{model}")
    props = {k: _not_null(v) for k, v in schema["properties"].items() if k not in _JSON_ONLY}
    props["image"] = {
        "type": "array",
        "items": _BINARY,
        "minItems": 1,
        "description": "The image(s) to edit, PNG / JPEG / WebP / GIF: repeat the field "
        "(`image[]` and `image[0]`, `image[1]`... are read too).",
    }
    props["mask"] = {**_BINARY, "description": "Transparent (or white) where to repaint, the size of the first image."}
    return {
        "schema": {
            "type": "object",
            "title": "ImageEditForm",
            "properties": props,
            "required": ["image", "prompt"],
            "additionalProperties": True,
        },
        "encoding": {"image": {"contentType": "image/png, image/jpeg, image/webp, image/gif"}},
    }


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`X | None` as `X`: a form field is left out, never null."""
    branches = [b for b in schema.get("anyOf", ()) if b != {"type": "null"}]
    if len(branches) != 1:
        return schema
    return {**{k: v for k, v in schema.items() if k not in ("anyOf", "default")}, **branches[0]}


FILE_FORM: dict[str, Any] = {
    "schema": {
        "type": "object",
        "title": "FileUpload",
        "required": ["content"],
        "additionalProperties": False,
        "properties": {
            "content": {**_BINARY, "description": "The image: PNG, JPEG, WebP or GIF, up to 50 MB."},
            "metadata": {
                "type": "string",
                "contentMediaType": "application/json",
                "description": "A JSON object, kept with the file and shown back.",
            },
        },
    }
}


class PredictionInput(BaseModel):
    """Replicate's Kontext inputs and the unified parameter names; others go to the provider."""

    model_config = ConfigDict(extra="allow")
    prompt: str
    input_image: str | None = Field(default=None, description="A data URI, a URL of this gateway or an http(s) URL.")
    input_images: list[str] | None = None
    aspect_ratio: str | None = Field(default=None, description="`W:H`, or `match_input_image`.")
    size: str | None = None
    resolution: str | None = None
    output_format: str | None = None
    output_quality: int | None = Field(default=None, ge=0, le=100)
    num_outputs: int | None = Field(default=None, ge=1)
    num_inference_steps: int | None = Field(default=None, ge=1, le=100)
    guidance: float | None = Field(default=None, ge=0, le=20)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)


class PredictionRequest(BaseModel):
    """A prediction: the model by `model` or `version` (or in the path), and its `input`."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(
        default=None, description="`owner/name`; not needed on /v1/models/{owner}/{name}/predictions."
    )
    version: str | None = Field(default=None, description="`owner/name:hash` (the hash is ignored).")
    input: PredictionInput
    webhook: str | None = Field(default=None, description="An http(s) URL to send events to (public addresses only).")
    webhook_events_filter: list[Literal[EVENTS]] | None = None  # type: ignore[valid-type]


class KeyLimits(BaseModel):
    """A key's limits; null removes one."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] | str | None = Field(
        default=None, description="Model ids it may use (a list, or comma-separated)."
    )
    budget_usd: float | None = Field(
        default=None, ge=0, le=MAX_BUDGET_USD, description="US dollars per `budget_period` (or the key's lifetime)."
    )
    budget_period: Literal[PERIODS] | None = None  # type: ignore[valid-type]
    rpm: int | None = Field(default=None, ge=1, le=MAX_LIMIT, description="Requests per minute.")
    ipm: int | None = Field(default=None, ge=1, le=MAX_LIMIT, description="Images per minute.")
    max_concurrent: int | None = Field(default=None, ge=1, le=MAX_LIMIT, description="Requests at once.")


class KeyCreate(KeyLimits):
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="A label: the team or app using the key.")
    admin: bool = False


# -- response bodies -------------------------------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageData(_Open):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(_Open):
    created: int
    data: list[ImageData]


class EstimatedProvider(_Open):
    """A provider the estimate is for, in the order they would be tried."""

    config_key: str
    provider: str
    configured: bool
    price_per_image: float
    currency: str
    size: str = Field(description="The size it would produce (`WxH`).")
    unavailable_reason: str | None = Field(default=None, description="What to configure, when it is not.")


class CostEstimate(_Open):
    """`dryRun=true`: the request validated and priced, nothing run. Priced from the catalog, so
    without provider keys too: then for the providers that would serve once configured."""

    object: Literal["cost_estimate"]
    model: str
    provider: str
    n: int
    total_cost_micros: int
    max_cost_micros: int
    currency: str
    size: str = Field(description="The size the first provider would produce (`WxH`).")
    requested_size: str | None = Field(default=None, description="The size asked for, when it differs.")
    configured: bool = Field(description="False when no provider is configured yet.")
    providers: list[EstimatedProvider]
    message: str | None = None


class Prediction(_Open):
    id: str
    model: str
    input: dict[str, Any]
    status: Literal["starting", "processing", "succeeded", "failed", "canceled"]
    created_at: str
    urls: dict[str, str]


class PredictionList(_Open):
    previous: str | None
    next: str | None
    results: list[Prediction]


class FileObject(_Open):
    id: str
    name: str
    content_type: str
    size: int
    metadata: dict[str, Any]
    urls: dict[str, str]


class ApiKey(_Open):
    object: Literal["api_key"]
    id: str
    name: str
    admin: bool
    status: Literal["active", "revoked"]


class ApiKeyCreated(ApiKey):
    key: str = Field(description="The key itself: shown this once.")


class ApiKeyList(_Open):
    object: Literal["list"]
    data: list[ApiKey]


class RequestList(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]
    has_more: bool
    next_cursor: str | None


# -- per route: what the decorators in api/*.py use --------------------------------------------------

_CREATE_PARAMS = (DRY_RUN, IDEMPOTENCY_KEY, PROVIDER)
GENERATIONS_BODY = body(json=ImageRequest, parameters=_CREATE_PARAMS)
EDITS_BODY = body(json=ImageRequest, multipart=edit_form(), parameters=_CREATE_PARAMS)
IMAGES_RESPONSES = responses(*GENERATE) | {
    200: {
        "description": "The images; the cost estimate with `dryRun=true`; server-sent events with `stream=true`.",
        "content": {
            "application/json": {"schema": {"anyOf": [ref(ImagesResponse), ref(CostEstimate)]}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
}

PREDICTION_BODY = body(json=PredictionRequest, parameters=(*_CREATE_PARAMS, PREFER))
PREDICTION_CREATED = responses(
    *PREDICT,
    ok=Prediction,
    status=201,
    description="The prediction as created (with `Prefer: wait`: as it ended, or as it is when the wait is over).",
) | responses(ok=CostEstimate, description="`dryRun=true`: the cost estimate; nothing is created.")
PREDICTION = responses(*READ, 404, ok=Prediction)
PREDICTION_CANCELED = responses(*WRITE, 404, ok=Prediction)
PREDICTION_LIST = responses(*READ, ok=PredictionList)

FILE_BODY = body(multipart=FILE_FORM)
FILE_CREATED = responses(*WRITE, 413, 415, ok=FileObject, status=201)
FILE = responses(*READ, 404, ok=FileObject)
_IMAGE_BYTES = {"image/*": {"schema": _BINARY}}
FILE_DOWNLOAD = responses(*READ, 404) | {200: {"description": "The file's bytes.", "content": _IMAGE_BYTES}}
BLOB = responses(400, 403, 404) | {200: {"description": "The image's bytes.", "content": _IMAGE_BYTES}}

KEY_CREATE_BODY = body(json=KeyCreate)
KEY_UPDATE_BODY = body(json=KeyLimits, required=False)
KEY_CREATED = responses(
    *WRITE,
    404,
    413,
    415,
    ok=ApiKeyCreated,
    status=201,
    description="The key's settings, and the key itself: the one time it is shown.",
)
KEY_UPDATED = responses(*WRITE, 404, 413, 415, ok=ApiKey)
KEY_REVOKED = responses(*WRITE, 404, ok=ApiKey)
KEY = responses(*READ, 403, 404, ok=ApiKey)
KEY_LIST = responses(*READ, 403, ok=ApiKeyList)

REQUEST_LIST = responses(*READ, ok=RequestList)
REQUEST = responses(*READ, 404, ok={"type": "object", "required": ["id", "object", "status"]})
REQUEST_PURGED = responses(*WRITE, 404, 409, ok={"type": "object", "required": ["id", "object", "status"]})
USAGE = responses(*READ, ok={"type": "object"})
MODEL_LIST = responses(*READ, ok={"type": "object", "required": ["object", "data"]})
MODEL = responses(*READ, 404, ok={"type": "object", "required": ["id", "object"]})
MODEL_STATS = responses(*READ, 404, ok={"type": "object"})
WEBHOOK_SECRET = responses(*READ, ok={"type": "object", "required": ["key"], "properties": {"key": {"type": "string"}}})


# -- the document ------------------------------------------------------------------------------------


def build(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi`: FastAPI's document (built by FastAPI's own method, with every setting of the app,
    and cached by it until the routes change), completed once as the module docstring says."""
    generate = app.openapi
    completed: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        doc = generate()
        if not any(doc is done for done in completed):
            completed[:] = [complete(doc)]
        return doc

    return openapi


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    """Add the request models and the bearer scheme, an untrusted Host's 400 on every route; drop the
    422s FastAPI guesses. In place; returns `doc`."""
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _, defs = models_json_schema([(m, "validation") for m in _MODELS.values()], ref_template=COMPONENTS + "{model}")
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "An API key (`kontext keys create`)."}
    }
    untrusted_host = {
        "description": ERRORS[400],
        "content": {"application/json": {"schema": {"$ref": COMPONENTS + ErrorResponse.__name__}}},
    }
    for path, item in doc.get("paths", {}).items():
        for operation in item.values():
            answers = operation.setdefault("responses", {})
            # FastAPI's guess for routes with parameters: the app renders validation errors as 400.
            if "HTTPValidationError" in str(answers.get("422", {})):
                del answers["422"]
            answers.setdefault("400", copy.deepcopy(untrusted_host))  # every route refuses an untrusted Host
            if path.startswith("/v1/") and not path.startswith("/v1/blobs/"):
                operation["security"] = [{"bearer": []}]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc
