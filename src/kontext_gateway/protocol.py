"""Request models of the public Images API, kept apart from the logic that serves them.

One model reads both the JSON body of /v1/images/generations and the form fields of
/v1/images/edits (multipart values arrive as strings; pydantic's lax mode converts them). Fields the
gateway does not know are kept (`extra="allow"`) and passed through to the provider.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    # The local engine's features (issue 7).
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
