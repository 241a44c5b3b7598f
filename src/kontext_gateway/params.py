"""The unified parameter set: definitions, size resolution and the compiled per-model schema.

Size rules (from the product pages): `size` wins. `WxH` fixes shape and scale; `W:H` is the same as
`aspect_ratio`. Otherwise `aspect_ratio` controls shape and `resolution` controls scale,
independently. Any ratio maps to the nearest ratio the model supports (in log space, so 7:1 between
4:1 and 8:1 gives 8:1), any tier to the nearest tier it supports. A ratio r at a tier of area A gives
h = round(sqrt(A / r)), w = round-half-up(h * r): 4:3 at 1K is 1183x887, 3:4 is 887x1182.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from .catalog import MODES, ModelSpec
from .errors import invalid

MAX_SIDE = 14142  # the product pages' custom-size limit per side
DEFAULT_AREA = 1024 * 1024

# Tiers by pixel area. "K" tiers are the long side of a square; megapixel tiers count 1024*1024.
TIER_AREAS: dict[str, int] = {"0.5K": 512 * 512, "1K": 1024 * 1024, "2K": 2048 * 2048, "4K": 4096 * 4096}

OUTPUT_FORMATS = ("png", "jpeg", "gif", "webp", "avif")
RESPONSE_FORMATS = ("url", "b64_json")

_WXH = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")
_MEGAPIXELS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:mp)?\s*$", re.IGNORECASE)
_KTIER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*k\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Size:
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def ratio(self) -> float:
        return self.width / self.height


@dataclass(frozen=True)
class SizeRequest:
    """What the user asked for, resolved against the model. `size` None means "auto"."""

    size: Size | None
    aspect_ratio: str | None = None  # the supported ratio chosen, when shape came from a ratio
    tier: str | None = None  # the supported tier chosen, when scale came from a tier
    exact: bool = False  # True when the user gave WxH


def parse_ratio(text: str) -> float | None:
    m = _RATIO.match(text)
    if not m:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return a / b if a > 0 and b > 0 else None


def nearest_ratio(ratio: float, supported: tuple[str, ...] | list[str]) -> str:
    """The supported ratio closest to `ratio` in log space (scale-symmetric: 2:1 and 1:2 are alike)."""
    return min(supported, key=lambda s: (abs(math.log(parse_ratio(s) / ratio)), s))  # type: ignore[operator]


def tier_area(tier: str) -> int | None:
    """'1K' -> 1048576, '0.25' (megapixels) -> 262144, 'auto' -> None. Raises ValueError if unknown."""
    t = tier.strip()
    if t.lower() == "auto":
        return None
    for name, area in TIER_AREAS.items():
        if t.lower() == name.lower():
            return area
    if m := _KTIER.match(t):
        return round((float(m.group(1)) * 1024) ** 2)
    if m := _MEGAPIXELS.match(t):
        mp = float(m.group(1))
        if mp > 0:
            return round(mp * 1024 * 1024)
    raise ValueError(tier)


def nearest_tier(area: int, supported: tuple[str, ...] | list[str]) -> str:
    return min(supported, key=lambda s: abs(math.log(tier_area(s) / area)))  # type: ignore[operator]


def size_for(ratio: float, area: int) -> Size:
    """The product pages' formula: h = round(sqrt(A/r)), w = round-half-up(h*r)."""
    h = max(1, math.floor(math.sqrt(area / ratio) + 0.5))
    w = max(1, math.floor(h * ratio + 0.5))
    return Size(w, h)


def ratio_label(ratio: float) -> str:
    frac = _simple_fraction(ratio)
    return f"{frac[0]}:{frac[1]}"


def _simple_fraction(x: float) -> tuple[int, int]:
    from fractions import Fraction

    f = Fraction(x).limit_denominator(32)
    return f.numerator, f.denominator


def resolve_size(
    model: ModelSpec,
    *,
    size: str | None,
    aspect_ratio: str | None,
    resolution: str | None,
    input_size: Size | None = None,
) -> SizeRequest:
    """Turn size / aspect_ratio / resolution into one request, validated against the model."""
    ratio_text = aspect_ratio
    if size is not None and size.strip() and size.strip().lower() != "auto":
        if m := _WXH.match(size):
            w, h = int(m.group(1)), int(m.group(2))
            if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
                raise invalid(
                    f"Invalid size '{size}': each side must be between 1 and {MAX_SIDE} pixels.",
                    param="size",
                    code="invalid_size",
                )
            if w * h > model.max_pixels:
                raise invalid(
                    f"Invalid size '{size}': {w * h} pixels is over the maximum of {model.max_pixels} "
                    f"({model.max_resolution}) for model '{model.id}'.",
                    param="size",
                    code="invalid_size",
                )
            return SizeRequest(Size(w, h), exact=True)
        if parse_ratio(size) is None:
            raise invalid(
                f"Invalid size '{size}': use 'WIDTHxHEIGHT' (e.g. '1024x1024'), an aspect ratio "
                "'W:H' (e.g. '16:9') or 'auto'.",
                param="size",
                code="invalid_size",
            )
        ratio_text = size  # "W:H" in size is an aspect ratio, and wins over aspect_ratio

    ratio: float | None = None
    chosen_ratio: str | None = None
    if (
        ratio_text is not None
        and ratio_text.strip()
        and ratio_text.strip().lower() not in ("auto", "match_input_image")
    ):
        ratio = parse_ratio(ratio_text)
        if ratio is None:
            param = "size" if ratio_text is size else "aspect_ratio"
            raise invalid(
                f"Invalid aspect ratio '{ratio_text}': use 'W:H' with positive numbers, e.g. '16:9'.",
                param=param,
                code="invalid_aspect_ratio",
            )
        chosen_ratio = nearest_ratio(ratio, model.aspect_ratios)
        ratio = parse_ratio(chosen_ratio)

    area: int | None = None
    chosen_tier: str | None = None
    if resolution is not None and resolution.strip():
        try:
            requested_area = tier_area(resolution)
        except ValueError:
            raise invalid(
                f"Invalid resolution '{resolution}': use 'auto', a tier ('0.5K', '1K', '2K', '4K') or "
                "megapixels (e.g. '0.25', '1').",
                param="resolution",
                code="invalid_resolution",
            ) from None
        if requested_area is not None:
            chosen_tier = nearest_tier(requested_area, model.resolutions)
            area = tier_area(chosen_tier)

    if ratio is None and area is None:
        return SizeRequest(None)  # auto: the provider's default (an edit keeps the input's shape)
    if ratio is None:  # scale only: keep the default shape (the input's for an edit)
        ratio = input_size.ratio if input_size else 1.0
    area = area or DEFAULT_AREA
    out = size_for(ratio, min(area, model.max_pixels))
    return SizeRequest(out, aspect_ratio=chosen_ratio, tier=chosen_tier)


# ---------------------------------------------------------------------------------------------------
# Parameter definitions and the compiled schema.

Handling = Literal["passthrough", "renamed", "converted", "emulated", "native"]


@dataclass(frozen=True)
class ParamDef:
    name: str
    group: str
    schema: dict[str, Any]
    description: str
    modes: tuple[str, ...] = MODES
    required_in: tuple[str, ...] = ()
    # Shown only for models with a provider that honours it (the local engine's features).
    only_if_handled: bool = False


UNIFIED_PARAMS: tuple[ParamDef, ...] = (
    ParamDef(
        "prompt",
        "Core Parameters",
        {"type": "string", "minLength": 1, "maxLength": 32000},
        "Required. The text prompt, or the edit instruction for the image.",
        required_in=MODES,
    ),
    ParamDef(
        "seed",
        "Core Parameters",
        {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
        "Random seed for reproducibility: the same seed and parameters give the same image.",
    ),
    ParamDef(
        "size",
        "Size & Layout",
        {"type": "string", "default": "auto"},
        'Image dimensions as WxH pixels (e.g. "1024x1024"), an aspect ratio (e.g. "16:9") or "auto". '
        "WxH determines both shape and scale (aspect_ratio and resolution are ignored when size is given). "
        "W:H is equivalent to aspect_ratio.",
    ),
    ParamDef(
        "aspect_ratio",
        "Size & Layout",
        {"type": "string"},
        'Aspect ratio of the output image (e.g. "16:9", "1:1"). Controls shape independently of scale. '
        "Any ratio is accepted and mapped to the nearest supported value.",
    ),
    ParamDef(
        "resolution",
        "Size & Layout",
        {"type": "string"},
        'Output resolution tier (e.g. "1K", "4K") or megapixels ("0.25", "1"). Controls scale independently '
        "of shape. Any tier is accepted and mapped to the nearest supported value.",
    ),
    ParamDef(
        "image",
        "Media Inputs",
        {"type": "array", "items": {"type": "string", "format": "binary"}},
        "Input image(s) to edit. Supports PNG, JPEG, WebP (and the first frame of a GIF), up to 50 MB each.",
        modes=("edit",),
        required_in=("edit",),
    ),
    ParamDef(
        "response_format",
        "Output & Format",
        {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "url"},
        "How to return the image: a signed URL on this gateway (valid for an hour) or inline base64.",
    ),
    ParamDef(
        "output_format",
        "Output & Format",
        {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "png"},
        "Output image format. The gateway converts to the requested format if the provider doesn't produce it.",
    ),
    ParamDef(
        "output_compression",
        "Output & Format",
        {"type": "integer", "minimum": 0, "maximum": 100},
        "Compression level for lossy formats (JPEG, WebP, AVIF): the codec quality, 100 is best.",
    ),
    ParamDef(
        "n",
        "Output & Format",
        {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
        "Number of images to generate. The gateway generates several in parallel even if the provider makes one. "
        "n x width x height must fit the provider's budget of pixels per request (`x-max-request-pixels`).",
    ),
    ParamDef(
        "cfg_scale",
        "Additional Parameters",
        {"type": "number", "minimum": 0, "maximum": 20},
        "Classifier-free guidance scale: higher values stick more closely to the prompt. "
        "Also accepted as `guidance` or `guidance_scale`.",
    ),
    ParamDef(
        "num_inference_steps",
        "Additional Parameters",
        {"type": "integer", "minimum": 1, "maximum": 100},
        "The number of inference steps to perform.",
    ),
    ParamDef(
        "mask",
        "Media Inputs",
        {"type": "string", "format": "binary"},
        "An image the size of the (first) input whose fully transparent areas are edited (OpenAI's "
        "semantics); without an alpha channel, its white areas are.",
        modes=("edit",),
        only_if_handled=True,
    ),
    ParamDef(
        "negative_prompt",
        "Additional Parameters",
        {"type": "string"},
        "What the image should not show. Used with true_cfg_scale above 1: a second transformer pass per "
        "step, so twice the work.",
        only_if_handled=True,
    ),
    ParamDef(
        "true_cfg_scale",
        "Additional Parameters",
        {"type": "number", "minimum": 1, "maximum": 20, "default": 1},
        "True classifier-free guidance with the negative prompt (diffusers' semantics); 1 turns it off.",
        only_if_handled=True,
    ),
    ParamDef(
        "loras",
        "Additional Parameters",
        {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "required": ["path"],
                "properties": {"path": {"type": "string"}, "scale": {"type": "number", "default": 1.0}},
            },
        },
        'LoRA adapters (fal\'s shape): [{"path": "style.safetensors", "scale": 0.8}], files under the '
        "gateway's adapters directory.",
        only_if_handled=True,
    ),
    ParamDef(
        "partial_images",
        "Output & Format",
        {"type": "integer", "minimum": 0, "maximum": 3, "default": 0},
        "With stream=true: previews sent while the image is made (server-sent events).",
        only_if_handled=True,
    ),
    ParamDef(
        "previous_response_id",
        "Media Inputs",
        {"type": "string"},
        "Edit the output of an earlier request, by its id, instead of uploading it again.",
        modes=("edit",),
    ),
)

PARAM_NAMES = frozenset(p.name for p in UNIFIED_PARAMS)
# Fields that clients send and the gateway understands without them being image parameters.
CONTROL_FIELDS = frozenset({"model", "user", "images", "image[]", "stream", "partial_images", "mask"})
# Spellings other APIs use for the same unified parameter.
PARAM_ALIASES = {"guidance": "cfg_scale", "guidance_scale": "cfg_scale", "steps": "num_inference_steps"}


def compile_schema(
    model: ModelSpec, handlings: dict[str, dict[str, dict[str, str]]], pixel_budgets: dict[str, int] | None = None
) -> dict[str, Any]:
    """The model's parameter schema: JSON Schema per mode, plus, per parameter, which providers
    honour it and how (native / renamed / converted / emulated / passthrough).

    `handlings` maps provider config_key -> parameter -> {"handling", "as"} for the providers that
    can serve this model; provider-only catalog parameters are passthrough for the providers listed.
    `pixel_budgets`: provider config_key -> output pixels (n x width x height) one request may ask.
    """
    pixel_budgets = pixel_budgets or {}
    modes: dict[str, Any] = {}
    for mode in model.modes:
        props: dict[str, Any] = {}
        required: list[str] = []
        for p in UNIFIED_PARAMS:
            if mode not in p.modes:
                continue
            schema = dict(p.schema)
            if p.name == "aspect_ratio":
                schema["examples"] = list(model.aspect_ratios)
            if p.name == "resolution":
                schema["enum"] = ["auto", *model.resolutions]
                schema["default"] = "auto"
            if p.name == "image":
                schema["maxItems"] = model.max_input_images
                schema["minItems"] = 1
            if p.name == "num_inference_steps" and model.default_steps:
                schema["default"] = model.default_steps
            if p.name == "cfg_scale" and model.default_guidance is not None:
                schema["default"] = model.default_guidance
            if p.name == "n" and pixel_budgets:
                schema["x-max-request-pixels"] = pixel_budgets
            providers = {key: h[p.name] for key, h in handlings.items() if p.name in h}
            if p.only_if_handled and not providers:
                continue
            props[p.name] = {**schema, "description": p.description, "x-group": p.group, "x-providers": providers}
            if mode in p.required_in:
                required.append(p.name)
        for extra in model.params:
            schema = {"type": extra.type}
            if extra.enum:
                schema["enum"] = list(extra.enum)
            if extra.minimum is not None:
                schema["minimum"] = extra.minimum
            if extra.maximum is not None:
                schema["maximum"] = extra.maximum
            props[extra.name] = {
                **schema,
                "description": extra.description,
                "x-group": "Additional Parameters",
                "x-providers": {
                    e.config_key: {"handling": "passthrough", "as": extra.name}
                    for e in model.providers_for(mode)
                    if e.provider in extra.providers
                },
                "x-provider-only": list(extra.providers),
            }
        modes[mode] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": True,  # unknown parameters pass through to the provider
        }
    sizes_1k = {r: str(size_for(parse_ratio(r), TIER_AREAS["1K"])) for r in model.aspect_ratios}  # type: ignore[arg-type]
    return {
        "model": model.id,
        "modes": modes,
        "sizes": {"1K": sizes_1k},
        "limits": {
            "max_resolution": model.max_resolution,
            "max_pixels": model.max_pixels,
            "max_side": MAX_SIDE,
            "max_input_images": model.max_input_images,
            # n x width x height per request, per provider: the local engine's is smaller on a CPU.
            "max_request_pixels": pixel_budgets,
        },
        "handling": {
            "passthrough": "Sent as-is to the provider",
            "native": "The provider takes it under the same name and meaning",
            "renamed": "Same value, mapped to the field name the provider expects",
            "converted": "Transformed to the provider's native format",
            "emulated": "Works even if the provider has no concept of it",
        },
    }
