"""The unified parameter set: definitions, size resolution and the compiled per-model schema.

Size rules (from the product pages): `size` wins. `WxH` fixes shape and scale; `W:H` is the same as
`aspect_ratio`. Otherwise `aspect_ratio` controls shape and `resolution` controls scale,
independently. Any ratio maps to the nearest ratio the model supports (in log space, so 7:1 between
4:1 and 8:1 gives 8:1), any tier to the nearest tier it supports. A ratio r at a tier of area A gives
h = round(sqrt(A / r)), w = round-half-up(h * r): 4:3 at 1K is 1183x887, 3:4 is 887x1182.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from .catalog import MODES, ExtraParam, Mode, ModelSpec
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
# What `tier_area` takes, as the schema's pattern (ECMA-262, no flags): "auto", "NK" or megapixels
# ("0.25", "4MP"), not zero.
RESOLUTION_PATTERN = r"^\s*(?:[Aa][Uu][Tt][Oo]|(?=[0-9.]*[1-9])[0-9]+(?:\.[0-9]+)?\s*(?:[Kk]|[Mm][Pp])?)\s*$"


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


@functools.lru_cache(maxsize=256)  # the same few ratios, parsed several times per request
def parse_ratio(text: str) -> float | None:
    m = _RATIO.match(text)
    if not m:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return a / b if a > 0 and b > 0 else None


def nearest_ratio(ratio: float, supported: tuple[str, ...] | list[str]) -> str:
    """The supported ratio closest to `ratio` in log space (scale-symmetric: 2:1 and 1:2 are alike)."""
    return _nearest_ratio(ratio, tuple(supported))


@functools.lru_cache(maxsize=1024)  # a request asks it for each route it is judged for, the same answer
def _nearest_ratio(ratio: float, supported: tuple[str, ...]) -> str:
    return min(supported, key=lambda s: (abs(math.log(parse_ratio(s) / ratio)), s))  # type: ignore[operator]


def tier_area(tier: str) -> int | None:
    """'1K' -> 1048576, '0.25' (megapixels) -> 262144, 'auto' -> None. Raises ValueError if unknown."""
    t = tier.strip()
    if t.lower() == "auto":
        return None
    for name, area in TIER_AREAS.items():
        if t.lower() == name.lower():
            return area
    # Zero is no scale; a tiny positive one is at least a pixel (the nearest tier is then the smallest).
    if (m := _KTIER.match(t)) and (k := float(m.group(1))) > 0:
        return max(1, round((k * 1024) ** 2))
    if (m := _MEGAPIXELS.match(t)) and (mp := float(m.group(1))) > 0:
        return max(1, round(mp * 1024 * 1024))
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
#
# A mode's schema lists a parameter only when something honours it in that mode: the gateway itself
# (`gateway=True`: it resolves sizes, encodes formats, fans out `n`, reads earlier outputs), or a
# provider that serves the mode (its adapter's handling table, or a catalog parameter naming it). So
# [dev] text-to-image, served by the local engine alone, does not list fal's or Replicate's edit-only
# parameters, and [pro] lists no `num_inference_steps`. Per provider, `x-providers` says how it takes
# the parameter; for the catalog's provider-only parameters also the type, range and default of the
# provider's own route in that mode.

Handling = Literal["passthrough", "renamed", "converted", "emulated", "native"]


@dataclass(frozen=True)
class ParamDef:
    name: str
    group: str
    schema: dict[str, Any]
    description: str
    modes: tuple[str, ...] = MODES
    required_in: tuple[str, ...] = ()
    # Honoured by the gateway whatever the provider: listed even where no provider declares it.
    gateway: bool = False


UNIFIED_PARAMS: tuple[ParamDef, ...] = (
    ParamDef(
        "prompt",
        "Core Parameters",
        {"type": "string", "minLength": 1, "maxLength": 32000},
        "Required. The text prompt, or the edit instruction for the image.",
        required_in=MODES,
        gateway=True,
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
        gateway=True,
    ),
    ParamDef(
        "aspect_ratio",
        "Size & Layout",
        {"type": "string"},
        'Aspect ratio of the output image (e.g. "16:9", "1:1"). Controls shape independently of scale. '
        "Any ratio is accepted and mapped to the nearest supported value.",
        gateway=True,
    ),
    ParamDef(
        "resolution",
        "Size & Layout",
        {"type": "string", "pattern": RESOLUTION_PATTERN, "default": "auto"},
        'Output scale: "auto", a tier "NK" ("0.5K", "1K", "2K", "4K": the area of a square N x 1024 pixels '
        'on a side) or megapixels ("0.25", "1", "4MP"). Controls scale independently of shape. '
        "Any value is accepted and mapped to the supported tier nearest in pixel area (in log space: "
        '"4K" on a model with only "1K" gives 1K); `examples` lists the supported tiers.',
        gateway=True,
    ),
    ParamDef(
        "image",
        "Media Inputs",
        {"type": "array", "items": {"type": "string", "format": "binary"}},
        "Input image(s) to edit. Supports PNG, JPEG, WebP (and the first frame of a GIF), up to 50 MB each.",
        modes=("edit",),
        required_in=("edit",),
        gateway=True,
    ),
    ParamDef(
        "response_format",
        "Output & Format",
        {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "url"},
        "How to return the image: a signed URL on this gateway (valid for an hour) or inline base64.",
        gateway=True,
    ),
    ParamDef(
        "output_format",
        "Output & Format",
        {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "png"},
        "Output image format. The gateway converts to the requested format if the provider doesn't produce it "
        "(`x-native-formats`: what each provider's routes make).",
        gateway=True,
    ),
    ParamDef(
        "output_compression",
        "Output & Format",
        {"type": "integer", "minimum": 0, "maximum": 100},
        "Compression level for lossy formats (JPEG, WebP, AVIF): the codec quality, 100 is best.",
        gateway=True,
    ),
    ParamDef(
        "n",
        "Output & Format",
        {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
        "Number of images to generate. The gateway generates several in parallel even if the provider makes one. "
        "n x width x height must fit the provider's budget of pixels per request (`x-max-request-pixels`).",
        gateway=True,
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
    ),
    ParamDef(
        "negative_prompt",
        "Additional Parameters",
        {"type": "string"},
        "What the image should not show. Used with true_cfg_scale above 1: a second transformer pass per "
        "step, so twice the work.",
    ),
    ParamDef(
        "true_cfg_scale",
        "Additional Parameters",
        {"type": "number", "minimum": 1, "maximum": 20, "default": 1},
        "True classifier-free guidance with the negative prompt (diffusers' semantics); 1 turns it off.",
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
    ),
    ParamDef(
        "partial_images",
        "Output & Format",
        {"type": "integer", "minimum": 0, "maximum": 3, "default": 0},
        "With stream=true: previews sent while the image is made (server-sent events).",
    ),
    ParamDef(
        "previous_response_id",
        "Media Inputs",
        {"type": "string"},
        "Edit the output of an earlier request, by its id, instead of uploading it again.",
        modes=("edit",),
        gateway=True,
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
    Each mode counts only the providers that serve it.
    `pixel_budgets`: provider config_key -> output pixels (n x width x height) one request may ask.
    """
    pixel_budgets = pixel_budgets or {}
    modes: dict[str, Any] = {}
    for mode in model.modes:
        serving = [e for e in model.providers_for(mode) if e.config_key in handlings]
        props: dict[str, Any] = {}
        required: list[str] = []
        for p in UNIFIED_PARAMS:
            if mode not in p.modes:
                continue
            providers = {e.config_key: h[p.name] for e in serving if p.name in (h := handlings[e.config_key])}
            if not providers and not p.gateway:
                continue  # nothing that serves this mode honours it
            schema = dict(p.schema)
            if p.name == "aspect_ratio":
                schema["examples"] = list(model.aspect_ratios)
            if p.name == "resolution":
                schema["examples"] = ["auto", *model.resolutions]
            if p.name == "image":
                schema["maxItems"] = model.max_input_images
                schema["minItems"] = 1
            if p.name == "num_inference_steps" and model.default_steps:
                schema["default"] = model.default_steps
            if p.name == "cfg_scale" and model.default_guidance is not None:
                schema["default"] = model.default_guidance
            if p.name == "n" and pixel_budgets:
                schema["x-max-request-pixels"] = pixel_budgets
            if p.name == "output_format":
                schema["x-native-formats"] = {e.config_key: list(e.output_formats) for e in serving if e.output_formats}
            props[p.name] = {**schema, "description": p.description, "x-group": p.group, "x-providers": providers}
            if mode in p.required_in:
                required.append(p.name)
        for extra in model.params:
            routes = {
                e.config_key: {"handling": "passthrough", "as": extra.name, **_route_facts(extra, e.provider, mode)}
                for e in serving
                if e.provider in extra.providers
            }
            if not routes:
                continue  # none of its providers serves this mode
            props[extra.name] = {
                **_unified_facts(extra),
                "description": extra.description,
                "x-group": "Additional Parameters",
                "x-providers": routes,
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
            "passthrough": "Sent to the provider under its own name, as the type its route takes (shown per provider)",
            "native": "The provider takes it under the same name and meaning",
            "renamed": "Same value, mapped to the field name the provider expects",
            "converted": "Transformed to the provider's native format",
            "emulated": "Works even if the provider has no concept of it",
        },
    }


def _facts(type_: str, enum: tuple[str, ...] | None, minimum: float | None, maximum: float | None) -> dict[str, Any]:
    """JSON Schema keywords for a type, its values and its range."""
    out: dict[str, Any] = {"type": type_}
    if enum:
        out["enum"] = list(enum)
    for key, bound in (("minimum", minimum), ("maximum", maximum)):
        if bound is not None:
            out[key] = int(bound) if type_ == "integer" and bound.is_integer() else bound
    return out


def _unified_facts(extra: ExtraParam) -> dict[str, Any]:
    """What the unified request accepts for a provider-only parameter: its declared type, and for an
    integer some route takes as a string, the string form too ("2" as well as 2)."""
    out = _facts(extra.type, extra.enum, extra.minimum, extra.maximum)
    if extra.string_form:
        out["type"] = ["integer", "string"]
        if extra.minimum is not None and extra.maximum is not None and extra.maximum - extra.minimum <= 100:
            forms = "|".join(str(v) for v in range(int(extra.minimum), int(extra.maximum) + 1))
            out["pattern"] = f"^(?:{forms})$"  # applies to the string form only
        else:
            out["pattern"] = "^-?[0-9]+$"
    return out


def _route_facts(extra: ExtraParam, provider: str, mode: Mode) -> dict[str, Any]:
    """The type, range and default the provider's route takes in this mode: the catalog's
    route facts where it states them, else the unified declaration (sent as it is)."""
    route = extra.route(provider, mode)
    if route is None:
        return _facts(extra.type, extra.enum, extra.minimum, extra.maximum)
    out = _facts(route.type, route.enum, route.minimum, route.maximum)
    if route.default is not None:
        out["default"] = route.default
    return out
