"""The compiled schema against the upstreams' own request schemas: what `x-providers` claims is true.

The published request schema of every hosted route is vendored, unmodified, in
kontext_gateway/providers/contracts/ (its README says where each comes from). For each model and
mode, each parameter's `x-providers` entry names a provider that serves the mode; unless the gateway
emulates the parameter, the route that serves the mode has the field the entry names (`as`), and where
the entry states a type, values, range or default (the catalog's provider-only parameters, and a
passthrough parameter's own declaration), the route's field has the same (with an input image, as the
route's own conditions say: Replicate and Fireworks take safety_tolerance up to 2). The other routes
of the mode (fal's and Replicate's several-image routes) take the catalog's parameters with the same
type and range. The catalog's `output_formats` and `aspect_ratios` per provider are checked against
the routes too.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import httpx
import jsonschema
import pytest

from kontext_gateway.catalog import Catalog, ModelSpec, ProviderEntry
from kontext_gateway.params import parse_ratio
from kontext_gateway.providers import contracts

CATALOG = Catalog.load()
IMAGE_FIELDS = {"input_image", "image_url", "image_urls", "input_image_1"}
# Fields a several-image route lacks that the one-image route of the same provider has.
ABSENT_ON_MULTI = {("replicate.flux-kontext-apps__multi-image-kontext-pro", "prompt_upsampling")}
MODEL_MODES = [(m.id, mode) for m in CATALOG.models for mode in m.modes]


def route_files(entry: ProviderEntry, mode: str) -> list[str]:
    """The routes a catalog entry calls in a mode, the one-image (or text-to-image) route first; as
    the adapters choose them (providers/*.py) from the provider model id."""
    pmid = entry.provider_model_id
    if entry.provider == "bfl":
        return [f"bfl.{pmid}"]
    if entry.provider == "fireworks":
        return [f"fireworks.{pmid.rsplit('/', 1)[-1]}"]
    if entry.provider == "replicate":
        routes = [pmid]
        if mode == "edit" and not pmid.endswith("-dev"):
            # The two-image apps; -max has no published input schema (its clients send -pro's names).
            routes.append(f"flux-kontext-apps/multi-image-kontext-{pmid.rsplit('-', 1)[-1]}")
        return [f"replicate.{r.replace('/', '__')}" for r in routes]
    if entry.provider == "fal":
        if pmid.startswith("fal-ai/flux-kontext"):  # [dev] and its LoRA route: edits only
            routes = [pmid]
        else:
            base = pmid.removesuffix("/text-to-image")
            routes = [base + "/text-to-image"] if mode == "text-to-image" else [base, base + "/multi"]
        return [f"fal.{r.replace('/', '__')}" for r in routes]
    raise AssertionError(f"no published routes for {entry.config_key}")


@cache
def route_schema(name: str) -> dict[str, Any] | None:
    return contracts.route_schema(name) if name in contracts.route_keys() else None


def route_field(route: dict[str, Any], name: str, *, with_image: bool) -> dict[str, Any] | None:
    """The route's schema for one field (inside Replicate's `input`), with the route's conditions on
    an input image applied when there is one."""
    body = route["$defs"]["Input"] if "input" in route["properties"] else route
    if name not in body["properties"]:
        return None
    field = dict(body["properties"][name])
    cond, then = body.get("if", {}), body.get("then", {})
    if with_image and set(cond.get("required", [])) & IMAGE_FIELDS:
        field.update(then.get("properties", {}).get(name, {}))
    return field


def facts(schema: dict[str, Any]) -> dict[str, Any]:
    """Type, values, range and default of a field, with "or null" left out."""
    options = [o for o in schema.get("anyOf", [schema]) if o.get("type") != "null"]
    field = {**schema, **options[0]}
    kind = field.get("type")
    if isinstance(kind, list):
        kind = [k for k in kind if k != "null"]
        kind = kind[0] if len(kind) == 1 else kind
    return {
        "type": kind,
        "enum": set(field["enum"]) if "enum" in field else None,
        "minimum": field.get("minimum"),
        "maximum": field.get("maximum"),
        "default": field.get("default"),
    }


def upstream_name(how: dict[str, Any]) -> str:
    """The field an x-providers entry names: the first word of `as` ("input.guidance (0-10)" -> guidance)."""
    m = re.match(r"[A-Za-z_][A-Za-z0-9_.]*", how["as"])
    assert m, how
    return m.group(0).removeprefix("input.")


@cache
def compiled(http_base: str, model_id: str) -> dict[str, Any]:
    return httpx.get(f"{http_base}/v1/models/{model_id}", params={"schema": "true"}, timeout=30).json()["schema"]


@pytest.mark.parametrize("model_id,mode", MODEL_MODES)
def test_x_providers_match_the_published_route_schemas(base_url: str, model_id: str, mode: str) -> None:
    model = CATALOG.get(model_id)
    entries = {e.config_key: e for e in model.providers}
    props = compiled(base_url, model_id)["modes"][mode]["properties"]
    checked = 0
    for name, prop in props.items():
        for key, how in prop["x-providers"].items():
            entry = entries[key]
            assert entry in model.providers_for(mode), f"{name}: {key} does not serve {mode}"
            if entry.provider == "local" or how["handling"] == "emulated":
                continue
            field = upstream_name(how)
            # What the entry claims the route takes: its own facts, else (sent as it is) the parameter's.
            claim_source = how if "type" in how else prop if how["handling"] == "passthrough" else None
            claim = facts(claim_source) if claim_source is not None else None
            if claim is not None and "default" not in how:
                claim.pop("default")
            primary, *others = route_files(entry, mode)
            for route_name in [primary, *others]:
                route = route_schema(route_name)
                if route is None:
                    continue  # a route with no published schema
                upstream = route_field(route, field, with_image=mode == "edit")
                if upstream is None:
                    if route_name == primary:
                        pytest.fail(f"{model_id} {mode} {name}: {route_name} has no field {field!r} ({key})")
                    assert claim is None or (route_name, field) in ABSENT_ON_MULTI, (route_name, field)
                    continue
                if claim is None:
                    continue
                found = facts(upstream)
                if "default" not in claim:
                    found.pop("default")
                assert claim == found, f"{model_id} {mode} {name} on {route_name} ({key})"
                checked += 1
    assert checked or all(e.provider == "local" for e in model.providers_for(mode))  # type: ignore[arg-type]


@pytest.mark.parametrize("model_id,mode", MODEL_MODES)
def test_native_formats_and_ratios_match_the_routes(base_url: str, model_id: str, mode: str) -> None:
    model = CATALOG.get(model_id)
    native = compiled(base_url, model_id)["modes"][mode]["properties"]["output_format"]["x-native-formats"]
    for entry in model.providers_for(mode):
        if entry.provider == "local":
            assert entry.config_key not in native  # the gateway encodes the engine's pixels: any format
            continue
        assert native[entry.config_key] == list(entry.output_formats or ())
        ratios = set(entry.aspect_ratios or model.aspect_ratios)
        for route_name in route_files(entry, mode):
            if (route := route_schema(route_name)) is None:
                continue
            formats = facts(route_field(route, "output_format", with_image=False) or {})["enum"]
            assert {"jpeg" if f == "jpg" else f for f in formats} == set(native[entry.config_key]), route_name
            shape = route_field(route, "aspect_ratio", with_image=False) or route_field(
                route, "resolution_mode", with_image=False
            )
            assert shape is not None, route_name
            if "enum" in shape:  # the ratios of the enum, besides match_input_image / auto / match_input
                assert ratios == {r for r in shape["enum"] if parse_ratio(r)}, route_name
            else:  # BFL and Fireworks: any W:H between 21:9 and 9:21
                assert all(9 / 21 - 1e-9 <= (parse_ratio(r) or 0) <= 21 / 9 + 1e-9 for r in ratios), route_name


def _serving(model: ModelSpec, mode: str) -> set[str]:
    return {e.config_key for e in model.providers_for(mode)}  # type: ignore[arg-type]


@pytest.mark.parametrize("model_id,mode", MODEL_MODES)
def test_a_mode_lists_only_what_its_providers_or_the_gateway_honour(base_url: str, model_id: str, mode: str) -> None:
    model = CATALOG.get(model_id)
    props = compiled(base_url, model_id)["modes"][mode]["properties"]
    gateway_own = {"prompt", "size", "aspect_ratio", "resolution", "image", "response_format"}
    gateway_own |= {"output_format", "output_compression", "n", "previous_response_id"}
    for name, prop in props.items():
        assert set(prop["x-providers"]) <= _serving(model, mode), name
        assert prop["x-providers"] or name in gateway_own, f"{model_id} {mode}: nothing honours {name}"


def test_safety_tolerance_takes_an_integer_or_its_string_form(base_url: str) -> None:
    for model_id in ("flux.1-kontext-pro", "flux.1-kontext-max"):
        for mode in ("text-to-image", "edit"):
            prop = compiled(base_url, model_id)["modes"][mode]["properties"]["safety_tolerance"]
            check = jsonschema.Draft202012Validator(prop)
            assert all(check.is_valid(v) for v in (0, 2, 6, "0", "2", "6"))
            assert not any(check.is_valid(v) for v in (-1, 7, "7", "two", 2.5, None))
