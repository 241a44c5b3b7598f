"""The model catalog: models.toml, validated at load, with id / alias / provider-key resolution.

A provider entry states what its routes take and make where it is narrower than the model: input
images (`max_input_images`), aspect ratios (`aspect_ratios`: a requested ratio goes to the nearest
one) and natively made formats (`output_formats`: others are made as png and converted by the
gateway). A provider-only parameter (`[[models.params]]`) states its unified type, and per provider
route (`[[models.params.routes]]`, optionally per mode) the type, range and default the route itself
takes, where they differ: the compiled schema shows both.
"""

from __future__ import annotations

import datetime as dt
import difflib
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import GatewayError, not_found

DEFAULT_CATALOG = Path(__file__).with_name("models.toml")

Mode = Literal["text-to-image", "edit"]
MODES: tuple[Mode, ...] = ("text-to-image", "edit")
ImageFormat = Literal["png", "jpeg", "gif", "webp", "avif"]
ParamType = Literal["string", "integer", "number", "boolean"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceComponent(_Strict):
    type: str
    metric: str
    unit_price: float = Field(ge=0)


class Pricing(_Strict):
    source: str
    currency: str = "USD"
    components: tuple[PriceComponent, ...]
    source_url: str | None = None
    effective_at: dt.date | None = None
    # Failures the provider documents it may still bill (an attempt's error class, e.g. fal's 422s:
    # "content_policy_violation", "invalid_request"): a failed task of these kinds is priced as made.
    billed_failures: tuple[str, ...] = ()

    def price_per_image(self) -> float:
        return sum(c.unit_price for c in self.components if c.metric == "image")


def _check_ratios(ratios: tuple[str, ...]) -> tuple[str, ...]:
    for r in ratios:
        a, _, b = r.partition(":")
        if not (a.isdigit() and b.isdigit() and int(a) > 0 and int(b) > 0):
            raise ValueError(f"aspect ratio must be W:H, got {r!r}")
    return ratios


class ProviderEntry(_Strict):
    provider: str
    config_key: str
    provider_model_id: str
    modes: tuple[Mode, ...] | None = None  # None: every mode of the model
    max_input_images: int = Field(default=1, ge=0, le=16)  # what this provider's routes accept
    # The ratios its routes take (None: the model's); the upstream makes its own size for the ratio.
    aspect_ratios: tuple[str, ...] | None = None
    # The formats its routes make natively (None: any, as for the local engine, whose pixels the gateway encodes).
    output_formats: tuple[ImageFormat, ...] | None = None
    pricing: Pricing

    @field_validator("aspect_ratios")
    @classmethod
    def _ratios(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else _check_ratios(v)

    @model_validator(mode="after")
    def _key_names_provider(self) -> ProviderEntry:
        if not self.config_key.startswith(self.provider + "/"):
            raise ValueError(f"config_key {self.config_key!r} must start with {self.provider + '/'!r}")
        return self


class RouteParam(_Strict):
    """How some providers' routes take a provider-only parameter, where it is not the unified type and
    range: e.g. fal's `safety_tolerance` is a string "1"-"6"; Replicate's is an integer 0-6, at most 2
    with an input image (so its edit mode says 0-2). `default` is the route's, where it states one."""

    providers: tuple[str, ...]
    modes: tuple[Mode, ...] | None = None  # None: every mode
    type: ParamType
    enum: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    default: bool | int | float | str | None = None


class ExtraParam(_Strict):
    """A provider-only parameter: passed through to the providers that honour it.

    `type`, `enum`, `minimum`, `maximum` are what the unified request accepts; `routes` say what each
    provider's routes take where that differs (the adapters convert). An integer that some route
    takes as a string is accepted in its string form too."""

    name: str
    type: ParamType
    description: str
    providers: tuple[str, ...]
    enum: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    routes: tuple[RouteParam, ...] = ()

    @model_validator(mode="after")
    def _routes_name_its_providers(self) -> ExtraParam:
        for r in self.routes:
            if unknown := set(r.providers) - set(self.providers):
                raise ValueError(f"{self.name}: routes name {sorted(unknown)}, not among its providers")
        return self

    def route(self, provider: str, mode: Mode) -> RouteParam | None:
        """What this provider's routes take in this mode, when the catalog states it."""
        for r in self.routes:
            if provider in r.providers and (r.modes is None or mode in r.modes):
                return r
        return None

    @property
    def string_form(self) -> bool:
        """Whether the unified request also takes the integer's string form (a route wants a string)."""
        return self.type == "integer" and any(r.type == "string" for r in self.routes)


class ModelSpec(_Strict):
    id: str
    name: str
    creator: str
    owned_by: str
    family: str
    status: Literal["active", "preview", "deprecated"]
    released: dt.date
    description: str
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    modes: tuple[Mode, ...]
    input_modalities: tuple[str, ...]
    output_modalities: tuple[str, ...]
    max_resolution: str
    max_input_images: int = Field(ge=0, le=16)
    aspect_ratios: tuple[str, ...]
    resolutions: tuple[str, ...]
    default_steps: int | None = None
    default_guidance: float | None = None
    avg_run_time_s: float | None = None
    license: str | None = None
    weights: str | None = None
    strengths: tuple[str, ...] = ()
    limitations: tuple[str, ...] = ()
    example_prompts: tuple[str, ...] = ()
    providers: tuple[ProviderEntry, ...] = ()
    params: tuple[ExtraParam, ...] = ()

    @field_validator("max_resolution")
    @classmethod
    def _wxh(cls, v: str) -> str:
        w, _, h = v.partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise ValueError(f"max_resolution must be WxH, got {v!r}")
        return v

    @field_validator("aspect_ratios")
    @classmethod
    def _ratios(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_ratios(v)

    @property
    def max_pixels(self) -> int:
        w, _, h = self.max_resolution.partition("x")
        return int(w) * int(h)

    @property
    def created(self) -> int:
        return int(dt.datetime.combine(self.released, dt.time(), dt.UTC).timestamp())

    @model_validator(mode="after")
    def _provider_limits(self) -> ModelSpec:
        for p in self.providers:
            if p.max_input_images > self.max_input_images:
                raise ValueError(
                    f"{p.config_key} accepts {p.max_input_images} input images, "
                    f"over the model's max_input_images {self.max_input_images}"
                )
        return self

    def providers_for(self, mode: Mode) -> list[ProviderEntry]:
        return [p for p in self.providers if p.modes is None or mode in p.modes]


class Catalog:
    def __init__(self, models: list[ModelSpec]) -> None:
        self.models = models
        self._index: dict[str, tuple[ModelSpec, ProviderEntry | None]] = {}
        for m in models:
            self._add(m.id, m, None)
            self._add(f"{m.owned_by}/{m.id}", m, None)
            for alias in m.aliases:
                self._add(alias, m, None)
            for p in m.providers:
                self._add(p.config_key, m, p)
        # Upstream names (Replicate's `black-forest-labs/flux-kontext-pro`...) name the model, not a
        # provider: the predictions API takes them as Replicate's clients send them.
        for m in models:
            for p in m.providers:
                if p.provider_model_id.lower() not in self._index:
                    self._add(p.provider_model_id, m, None)

    def _add(self, key: str, model: ModelSpec, provider: ProviderEntry | None) -> None:
        key = key.lower()
        if key in self._index and self._index[key][0].id != model.id:
            raise ValueError(f"catalog: {key!r} names both {self._index[key][0].id} and {model.id}")
        self._index.setdefault(key, (model, provider))

    @classmethod
    def load(cls, path: Path | None = None) -> Catalog:
        path = path or DEFAULT_CATALOG
        with open(path, "rb") as f:
            data = tomllib.load(f)
        models = [ModelSpec.model_validate(m) for m in data.get("models", [])]
        if not models:
            raise ValueError(f"catalog {path} lists no models")
        return cls(models)

    def resolve(self, name: str | None, *, param: str = "model") -> tuple[ModelSpec, ProviderEntry | None]:
        """Model id, alias, `{owned_by}/{id}` or provider config key -> (model, forced provider entry)."""
        if not name or not name.strip():
            raise GatewayError("you must provide a model parameter", param=param, code="missing_required_parameter")
        hit = self._index.get(name.strip().lower())
        if hit is None:
            raise not_found(self._unknown_message(name), param=param, code="model_not_found")
        return hit

    def get(self, name: str) -> ModelSpec:
        return self.resolve(name)[0]

    def _unknown_message(self, name: str) -> str:
        msg = f"The model '{name}' does not exist."
        close = difflib.get_close_matches(name.lower(), list(self._index), n=1, cutoff=0.5)
        if close:
            msg += f" Did you mean '{self._index[close[0]][0].id}'?"
        return msg + f" Available models: {', '.join(m.id for m in self.models)}."

    @cached_property
    def ids(self) -> list[str]:
        return [m.id for m in self.models]
