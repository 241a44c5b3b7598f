"""The hosted upstreams' published contracts, as JSON Schema 2020-12, and validators for them.

`routes/` holds verbatim copies of the published schemas (README.md beside this file says where they
come from); nothing here edits or loosens them. A schema is named by its file name less the suffix:

- request schemas, `routes/<key>.schema.json`: the body one route takes, closed (additionalProperties
  false, so a body that validates carries only fields the route documents). Keys such as
  "bfl.flux-kontext-pro", "replicate.black-forest-labs__flux-kontext-pro" (the whole prediction body,
  `input` included), "fal.fal-ai__flux-pro__kontext__max__multi", "fireworks.flux-kontext-pro", and
  Fireworks' poll body "fireworks.get_result";
- response schemas, `routes/<key>.response.schema.json`: what an upstream answers, open (more fields
  may come). Keys such as "bfl.get_result", "fal.queue.status", "replicate.prediction".

`request_key` / `result_key` find a route's keys from index.json by provider and route as the
provider names it ("replicate", "black-forest-labs/flux-kontext-pro"); None where the index documents
no schema (Replicate's multi-image-kontext-max has no published input).

A body is checked by `request_problems` / `response_problems` (structured: where, which keyword, what)
or `request_errors` / `response_errors` (the same as "path: message" lines). One problem per field:
where a value breaks several keywords (a number where a string enum is wanted), the most telling one,
as jsonschema's best_match ranks them. `format` stays an annotation, as 2020-12 has it by default:
whether "uri" or "date-time" would be checked must not depend on which optional packages are installed.

Each body is first asked of the same schema compiled by jsonschema-rs, which says only whether it
validates, about a hundred times faster than jsonschema's `iter_errors`; a body it finds valid has
no problems, and every other body is judged and explained by jsonschema, as before. (Both implement
2020-12; tests check that they agree on bodies made around every vendored schema.)
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import jsonschema_rs
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match, relevance

_REQUEST = ".schema.json"
_RESPONSE = ".response.schema.json"


@dataclass(frozen=True)
class Problem:
    """One way a body breaks a schema."""

    path: tuple[str | int, ...]  # where in the body: ("input", "seed"), ("image_urls", 0); () is the body
    keyword: str  # the schema keyword it fails: "required", "additionalProperties", "type", "maximum"...
    message: str
    # Found under an if/then: a limit that holds only given another field (safety_tolerance <= 2 with an
    # input image), which some providers answer differently from a plain type error.
    conditional: bool = False

    @property
    def where(self) -> str:
        """The path as one string: "input.seed", "image_urls[0]", "(body)" for the body itself."""
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out or "(body)"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


# -- the files -------------------------------------------------------------------------------------------


def _routes() -> Traversable:
    return resources.files(__name__) / "routes"


@functools.cache
def _names() -> tuple[str, ...]:
    return tuple(sorted(p.name for p in _routes().iterdir() if p.name.endswith(".json")))


@functools.cache
def _load(name: str) -> dict[str, Any]:
    data = json.loads((_routes() / name).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"routes/{name} is not a JSON object")
    return data


@functools.cache
def index() -> dict[str, Any]:
    """index.json: each provider's transport and responses, and every route's request and result files."""
    data = json.loads((resources.files(__name__) / "index.json").read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("index.json is not a JSON object")
    return data


def route_keys() -> list[str]:
    """Every request schema's key, sorted."""
    return [n.removesuffix(_REQUEST) for n in _names() if not n.endswith(_RESPONSE)]


def response_keys() -> list[str]:
    """Every response schema's key, sorted."""
    return [n.removesuffix(_RESPONSE) for n in _names() if n.endswith(_RESPONSE)]


def _file(key: str, suffix: str) -> str:
    """The file of request (`_REQUEST`) or response (`_RESPONSE`) schema `key`; KeyError naming the known
    ones when there is none."""
    name = key + suffix
    if name not in _files(suffix):
        kind, known = ("response", response_keys()) if suffix == _RESPONSE else ("request", route_keys())
        raise KeyError(f"no {kind} schema {key!r}; known: {', '.join(known)}")
    return name


@functools.cache
def _files(suffix: str) -> frozenset[str]:
    keys = response_keys() if suffix == _RESPONSE else route_keys()
    return frozenset(key + suffix for key in keys)


def route_schema(key: str) -> dict[str, Any]:
    """A route's request schema (a copy: the vendored one stays as published)."""
    return copy.deepcopy(_load(_file(key, _REQUEST)))


def response_schema(key: str) -> dict[str, Any]:
    """A response schema (a copy)."""
    return copy.deepcopy(_load(_file(key, _RESPONSE)))


def _key_of(ref: str | None, suffix: str) -> str | None:
    return None if ref is None else ref.removeprefix("routes/").removesuffix(suffix)


def _route(provider: str, route: str) -> dict[str, Any] | None:
    for item in index()["routes"]:
        if item["provider"] == provider and item["route"] == route:
            return dict(item)
    return None


def request_key(provider: str, route: str) -> str | None:
    """The request schema's key for a provider's route ("fal", "fal-ai/flux-pro/kontext/max/multi" ->
    "fal.fal-ai__flux-pro__kontext__max__multi"); None for a route the index has no schema for."""
    item = _route(provider, route)
    return None if item is None else _key_of(item.get("request"), _REQUEST)


def result_key(provider: str, route: str) -> str | None:
    """The response schema of a route's result ("fal", "fal-ai/flux-kontext/dev" -> "fal.kontext-dev.result")."""
    item = _route(provider, route)
    return None if item is None else _key_of(item.get("result"), _RESPONSE)


# -- validation ------------------------------------------------------------------------------------------


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(_load(name))


@functools.cache
def _quick_validator(name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator(_load(name), validate_formats=False)


def request_problems(key: str, body: Any) -> list[Problem]:
    """How `body` breaks the route's request schema; [] when it validates."""
    return _problems_in(_file(key, _REQUEST), body)


def response_problems(key: str, body: Any) -> list[Problem]:
    """How `body` breaks the response schema; [] when it validates."""
    return _problems_in(_file(key, _RESPONSE), body)


def _problems_in(name: str, body: Any) -> list[Problem]:
    try:
        if _quick_validator(name).is_valid(body):
            return []
    except ValueError:  # not a JSON value as jsonschema-rs reads them (bytes, a str subclass...)
        pass
    return _problems(_validator(name), body)


def request_errors(key: str, body: Any) -> list[str]:
    """`request_problems` as "path: message" lines."""
    return [str(p) for p in request_problems(key, body)]


def response_errors(key: str, body: Any) -> list[str]:
    """`response_problems` as "path: message" lines."""
    return [str(p) for p in response_problems(key, body)]


def _problems(validator: Draft202012Validator, body: Any) -> list[Problem]:
    found: list[Problem] = []
    seen: set[tuple[str | int, ...]] = set()
    # Most telling first, so the one kept for a field is the one best_match would pick.
    for error in sorted(validator.iter_errors(body), key=relevance):
        for problem in _explain(error):
            if problem.path not in seen:
                seen.add(problem.path)
                found.append(problem)
    # Sorted by where, for a stable order.
    return sorted(found, key=lambda p: [str(x) for x in p.path])


def _explain(error: ValidationError) -> list[Problem]:
    """One problem per field an error is about: a missing or an extra property is named in the path."""
    conditional = "then" in error.absolute_schema_path or "else" in error.absolute_schema_path
    path = tuple(error.absolute_path)
    if error.validator == "required":
        present = error.instance if isinstance(error.instance, dict) else {}
        wanted = error.validator_value if isinstance(error.validator_value, list) else []
        return [
            Problem((*path, name), "required", "required, missing", conditional)
            for name in wanted
            if name not in present
        ]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        declared = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        return [
            Problem((*path, name), "additionalProperties", "not a field of this route", conditional)
            for name in error.instance
            if name not in declared
        ]
    if error.validator in ("anyOf", "oneOf") and error.context:
        # "not valid under any of the given schemas" says little: say what the closest branch wanted,
        # a branch of the value's own type first ('gif' breaks the enum, not the null branch).
        closest = best_match([e for e in error.context if e.validator != "type"] or error.context)
        if closest is not None and tuple(closest.absolute_path) == path:
            return [Problem(path, str(closest.validator), closest.message, conditional)]
    return [Problem(path, str(error.validator), error.message, conditional)]
