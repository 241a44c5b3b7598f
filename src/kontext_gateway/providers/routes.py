"""One upstream route as its provider publishes it: the fields its request takes, their types and ranges.

Dialects build request bodies from a `Route`: a field the route does not publish is never sent (the
request parameter behind it is reported as ignored), and a built body is checked against the route's
published schema before it is sent, so a value out of the route's range is refused here, naming the
request parameter and the range, instead of coming back from the upstream as a 422.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .contracts import Problem, request_key, request_problems, route_schema


@dataclass(frozen=True)
class Route:
    provider: str
    id: str  # the route as the provider names it: "fal-ai/flux-pro/kontext/max/multi"
    key: str  # the contract the body is checked against
    fields: dict[str, dict[str, Any]]  # field -> its JSON Schema (Replicate: the fields of `input`)
    note: str | None = None  # why `key` is another route's contract, where the route publishes none

    def has(self, field: str) -> bool:
        return field in self.fields

    def problems(self, body: Any) -> list[Problem]:
        """How `body` breaks the route's published schema; [] when it validates."""
        return request_problems(self.key, body)

    def allowed(self, field: str) -> str:
        """What the route takes for `field`, in words: "1 to 20", "one of 1:1, 16:9", "an integer"."""
        return describe(self.fields.get(field, {}))


def describe(schema: dict[str, Any]) -> str:
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    parts = []
    for option in options:
        if "enum" in option:
            parts.append("one of " + ", ".join(str(v) for v in option["enum"]))
            continue
        kind = option.get("type")
        kinds = [k for k in (kind if isinstance(kind, list) else [kind]) if k not in (None, "null")]
        low, high = option.get("minimum"), option.get("maximum")
        what = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false"}
        text = " or ".join(what.get(k, k) for k in kinds) or "a value"
        if low is not None and high is not None:
            text += f" from {low:g} to {high:g}"
        elif low is not None:
            text += f" of at least {low:g}"
        elif high is not None:
            text += f" of at most {high:g}"
        parts.append(text)
    return "; or ".join(parts) or "any value"


@functools.cache
def route(provider: str, route_id: str, *, same_as: str | None = None) -> Route:
    """The published route `route_id` of `provider`. `same_as`: the route whose contract stands in
    where this one publishes none (Replicate's multi-image-kontext-max takes the -pro app's inputs)."""
    key = request_key(provider, route_id)
    note = None
    if key is None and same_as is not None:
        key = request_key(provider, same_as)
        note = f"{route_id} publishes no input schema; checked as {same_as}"
    if key is None:
        raise LookupError(f"no published request schema for {provider} route {route_id!r}")
    schema = route_schema(key)
    properties = schema.get("properties", {})
    if provider == "replicate":  # a prediction body: the model's fields are those of `input`
        properties = _resolve(schema, properties["input"]).get("properties", {})
    return Route(provider, route_id, key, dict(properties), note)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return node
    target: Any = schema
    for part in ref[2:].split("/"):
        target = target[part]
    return _resolve(schema, target)
