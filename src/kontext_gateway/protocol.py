"""Requests of the two public APIs, parsed, and kept apart from the logic that serves them.

`ImageRequest` reads the JSON body of /v1/images/generations, the form fields of /v1/images/edits
(multipart values arrive as strings; pydantic's lax mode converts them) and a prediction's `input`
alike. Fields the gateway does not know are kept (`extra="allow"`) and passed through to the provider.

The HTTP layer (and the CLI) turn every request into an `ImageCall` (the Images API: `image_call`; a
prediction: `prediction_call`, which maps Replicate's input names onto the same model) before any
service sees it: typed parameters, the input images and mask as `ImageSource`s still to be read, and
the fields as sent (for the record of a refused request and for Idempotency-Key fingerprints).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .catalog import Mode
from .errors import GatewayError, invalid
from .params import OUTPUT_FORMATS, PARAM_ALIASES, RESPONSE_FORMATS

MAX_PROMPT_CHARS = 32_000  # the published schema's maxLength for `prompt`


class ImageRef(BaseModel):
    """One entry of the JSON edit form's `images`: an http(s) or data URL, or a file id."""

    model_config = ConfigDict(extra="forbid")
    image_url: str | None = None
    file_id: str | None = Field(default=None, max_length=256)


class LoraRef(BaseModel):
    """fal's shape: a LoRA adapter by path (a file under the adapters directory, or an http(s) URL
    when downloads are allowed) and its scale."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=1024)
    scale: float = Field(default=1.0, ge=-4, le=4)


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow", str_strip_whitespace=False)

    model: str | None = Field(default=None, max_length=256)
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, max_length=64)
    aspect_ratio: str | None = Field(default=None, max_length=64)
    resolution: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    response_format: str | None = None
    output_format: str | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    cfg_scale: float | None = Field(default=None, ge=0, le=20)
    num_inference_steps: int | None = Field(default=None, ge=1, le=100)
    user: str | None = Field(default=None, max_length=512)
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    images: list[ImageRef] | None = Field(default=None, max_length=16)  # models take at most 4
    # The local engine's features.
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    true_cfg_scale: float | None = Field(default=None, ge=1, le=20)
    loras: list[LoraRef] | None = Field(default=None, max_length=8)
    previous_response_id: str | None = Field(default=None, max_length=256)  # edit an earlier output, by its id

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """Accept the spellings other APIs use (guidance, guidance_scale, steps) for unified params."""
        if isinstance(data, dict):
            data = dict(data)
            for alias, name in PARAM_ALIASES.items():
                if alias in data and name not in data:
                    data[name] = data.pop(alias)
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: str | None) -> str | None:
        if v is not None and v not in RESPONSE_FORMATS:
            raise ValueError(f"'{v}' is not one of {', '.join(RESPONSE_FORMATS)}")
        return v

    @field_validator("output_format")
    @classmethod
    def _output_format(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().lower()
        v = "jpeg" if v == "jpg" else v
        if v not in OUTPUT_FORMATS:
            raise ValueError(f"'{v}' is not a supported output format; use one of {', '.join(OUTPUT_FORMATS)}")
        return v

    def passthrough(self, known: frozenset[str]) -> dict[str, Any]:
        """Fields the gateway does not interpret itself: they go to the provider as they are."""
        return {k: v for k, v in (self.model_extra or {}).items() if k not in known}


def parse_image_request(fields: dict[str, Any]) -> ImageRequest:
    """Validate a request body, turning pydantic's errors into the OpenAI envelope (400, with param)."""
    try:
        return ImageRequest.model_validate(fields)
    except ValidationError as exc:
        raise _to_gateway_error(exc) from None


def _to_gateway_error(exc: ValidationError) -> GatewayError:
    err = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    kind = err.get("type", "")
    if kind == "missing":
        return GatewayError(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    value = err.get("input")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if kind in ("string_too_long", "too_long"):
        limit = err.get("ctx", {}).get("max_length")
        unit = "characters" if kind == "string_too_long" else "items"
        return invalid(
            f"Invalid '{param}': {len(value)} {unit}; the limit is {limit} {unit}.",
            param=param,
            code="string_above_max_length" if unit == "characters" else "array_above_max_length",
        )
    if kind.startswith(("greater_than", "less_than")):
        limits = err.get("ctx", {})
        bound = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in limits.items())
        return invalid(
            f"Invalid '{param}': {value!r} is out of range ({bound}).",
            param=param,
            code="integer_out_of_range" if isinstance(value, int) else "invalid_value",
        )
    return invalid(
        f"Invalid '{param}': {msg}.",
        param=param,
        code="invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value",
    )


# -- a request, parsed: what the services take ------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """One input image (or mask) as the client gave it, not yet read: uploaded bytes, or a URL (a data
    URL, a link of this gateway, or, for predictions, an outside URL the gateway fetches)."""

    param: str  # the field it came in as: what an error about it names
    data: bytes | None = None
    url: str | None = None


@dataclass(frozen=True)
class ImageCall:
    """One image request of either API (the OpenAI Images API, a Replicate prediction), parsed.

    `invalid`: what is wrong with it, when parsing found something. The service records the refused
    request (the history shows what was asked and why it failed) and raises it."""

    mode: Mode
    fields: dict[str, Any]  # as sent, without file bytes: recorded, and fingerprinted for Idempotency-Key
    params: ImageRequest | None
    images: tuple[ImageSource, ...] = ()
    masks: tuple[ImageSource, ...] = ()
    invalid: GatewayError | None = None
    fetch_urls: bool = False  # outside http(s) image URLs are fetched (predictions) rather than refused
    endpoint: str | None = None  # "images.generations", "images.edits", "predictions"
    input: dict[str, Any] | None = None  # a prediction's input as recorded (data URIs abbreviated)
    version: str | None = None

    @property
    def files(self) -> list[bytes]:
        """The uploaded bytes, in order (images, then masks)."""
        return [s.data for s in (*self.images, *self.masks) if s.data is not None]


@dataclass(frozen=True)
class PredictionCall:
    """A prediction's create body, parsed: the image request it makes, and where to tell its end."""

    call: ImageCall
    webhook: str | None = None
    webhook_events: list[str] | None = None


def image_call(mode: Mode, fields: dict[str, Any], uploads: Sequence[ImageSource] = ()) -> ImageCall:
    """The Images API's request: JSON fields (or multipart form fields) and uploaded files (`image`,
    `image[]`... and `mask`). JSON edits name their images in `images: [{"image_url"}]` and their mask
    in `mask: {"image_url"}` (OpenAI's shapes)."""
    endpoint = "images.edits" if mode == "edit" else "images.generations"
    try:
        params = parse_image_request(fields)
        images = [s for s in uploads if s.param != "mask"] + _referenced(params)
        masks = [s for s in uploads if s.param == "mask"] + _json_mask(fields)
    except GatewayError as exc:
        return ImageCall(mode, fields, None, invalid=exc, endpoint=endpoint)
    return ImageCall(mode, fields, params, tuple(images), tuple(masks), endpoint=endpoint)


def _referenced(params: ImageRequest) -> list[ImageSource]:
    out = []
    for i, ref in enumerate(params.images or []):
        if ref.image_url is None:
            raise invalid(
                "Each entry of 'images' needs an 'image_url' (file ids are not supported).",
                param=f"images[{i}]",
                code="invalid_value",
            )
        out.append(ImageSource(f"images[{i}].image_url", url=ref.image_url))
    return out


def _json_mask(fields: dict[str, Any]) -> list[ImageSource]:
    ref = fields.get("mask")
    if ref is None or isinstance(ref, (bytes, bytearray)):
        return []
    url = ref.get("image_url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise invalid(
            '\'mask\' must be {"image_url": "data:image/png;base64,..."} (or a file upload).',
            param="mask",
            code="invalid_value",
        )
    return [ImageSource("mask.image_url", url=url)]


# Replicate's names for unified parameters (the rest, e.g. guidance, are aliases of ImageRequest).
RENAMES = {"output_quality": "output_compression", "num_outputs": "n"}
SINGLE_IMAGE_KEYS = ("input_image", "image", "image_url")
LIST_IMAGE_KEYS = ("input_images", "images", "image_urls")
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")


def prediction_call(model: str | None, body: dict[str, Any]) -> PredictionCall:
    """A prediction's create body (`model` from the route, or `model` / `version` in the body) as the
    same image request the Images API makes. `input` takes Replicate's Kontext names (`input_image`,
    `input_image_1..4`, `input_images`, `aspect_ratio` with `match_input_image`, `output_quality`,
    `num_outputs`...) and the unified ones. An edit when it names images."""
    version = body.get("version")
    name = model or body.get("model") or (version.split(":", 1)[0] if isinstance(version, str) else None)
    if not name:
        raise invalid(
            "Name the model: POST /v1/models/{owner}/{name}/predictions, or 'model' / 'version'.",
            param="model",
            code="missing_required_parameter",
        )
    inputs = body.get("input")
    if not isinstance(inputs, dict):
        raise invalid(
            "'input' must be an object of the model's inputs.", param="input", code="missing_required_parameter"
        )
    webhook, events = _webhook(body)
    fields: dict[str, Any] = {}
    numbered = sorted(
        (k for k in inputs if k.startswith("input_image_") and k[12:].isdigit()), key=lambda k: int(k[12:])
    )
    for key, value in inputs.items():
        if key in SINGLE_IMAGE_KEYS or key in numbered or key in LIST_IMAGE_KEYS:
            continue
        if key == "aspect_ratio" and value == "match_input_image":
            continue  # the default for an edit: keep the input's shape
        fields[RENAMES.get(str(key), str(key))] = value
    fields["model"] = name
    sources = [
        _source(f"input.{key}", inputs[key]) for key in (*SINGLE_IMAGE_KEYS, *numbered) if inputs.get(key) is not None
    ]
    for key in LIST_IMAGE_KEYS:
        value = inputs.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise invalid(f"'{key}' must be a list of image URLs.", param=f"input.{key}", code="invalid_type")
        for i, item in enumerate(value):
            sources.append(_source(f"input.{key}[{i}]", item.get("image_url") if isinstance(item, dict) else item))
    recorded = {k: (_summary(v) if isinstance(v, str) and v.startswith("data:") else v) for k, v in inputs.items()}
    mode: Mode = "edit" if sources else "text-to-image"
    try:
        params = parse_image_request(fields)
    except GatewayError as exc:
        call = ImageCall(
            mode,
            fields,
            None,
            tuple(sources),
            invalid=exc,
            fetch_urls=True,
            endpoint="predictions",
            input=recorded,
            version=version if isinstance(version, str) else None,
        )
    else:
        call = ImageCall(
            mode,
            fields,
            params,
            tuple(sources),
            fetch_urls=True,
            endpoint="predictions",
            input=recorded,
            version=version if isinstance(version, str) else None,
        )
    return PredictionCall(call, webhook, events)


def _source(param: str, value: Any) -> ImageSource:
    if not isinstance(value, str) or not value:
        raise invalid(f"'{param}' must be an image URL or a data URI.", param=param, code="invalid_image_url")
    return ImageSource(param, url=value)


def _webhook(body: dict[str, Any]) -> tuple[str | None, list[str] | None]:
    webhook = body.get("webhook")
    events = body.get("webhook_events_filter")
    if webhook is None:
        return None, None
    if not isinstance(webhook, str):
        raise GatewayError("'webhook' must be a URL.", status=422, param="webhook", code="invalid_url")
    if events is not None and (not isinstance(events, list) or any(e not in WEBHOOK_EVENTS for e in events)):
        raise GatewayError(
            f"'webhook_events_filter' takes a list of {', '.join(WEBHOOK_EVENTS)}.",
            status=422,
            param="webhook_events_filter",
            code="invalid_value",
        )
    return webhook, events


def _summary(data_uri: str) -> str:
    head = data_uri.split(",", 1)[0]
    return f"{head},... ({len(data_uri)} characters)"
