"""The vendored upstream contracts (kontext_gateway.providers.contracts): every file loads and is a valid
JSON Schema 2020-12, index.json names only files that are there, and the validators name the field
that breaks a schema: an unknown one, a wrong type, a missing one, a conditional cap. The quick check
(jsonschema-rs) agrees with jsonschema on every body one step from each schema's examples and on bodies
generated on either side of each schema's line."""

from __future__ import annotations

import json
import math
from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from kontext_gateway.providers import contracts, routes
from kontext_gateway.providers.contracts import Problem

DRAFT = "https://json-schema.org/draft/2020-12/schema"
FILES = sorted(p.name for p in (resources.files(contracts.__name__) / "routes").iterdir())


@pytest.mark.parametrize("name", FILES)
def test_every_vendored_file_is_a_2020_12_schema(name: str) -> None:
    schema = json.loads((resources.files(contracts.__name__) / "routes" / name).read_text(encoding="utf-8"))
    assert schema["$schema"] == DRAFT
    Draft202012Validator.check_schema(schema)  # raises SchemaError when it is not one


def test_keys_cover_every_file_once() -> None:
    requests = [f"{k}.schema.json" for k in contracts.route_keys()]
    responses = [f"{k}.response.schema.json" for k in contracts.response_keys()]
    assert sorted(requests + responses) == FILES
    assert {"bfl.flux-kontext-pro", "fireworks.flux-kontext-pro", "fireworks.get_result"} <= set(contracts.route_keys())
    assert {"bfl.get_result", "fal.queue.status", "replicate.prediction"} <= set(contracts.response_keys())


@pytest.mark.parametrize("key", contracts.route_keys())
def test_request_schemas_load_are_closed_and_take_their_own_examples(key: str) -> None:
    schema = contracts.route_schema(key)
    assert schema["additionalProperties"] is False
    if key.startswith("replicate."):  # the prediction body, and the model input inside it
        assert schema["$defs"]["Input"]["additionalProperties"] is False
    for example in schema.get("examples", []):
        assert contracts.request_errors(key, example) == []


@pytest.mark.parametrize("key", contracts.response_keys())
def test_response_schemas_load_and_take_their_own_examples(key: str) -> None:
    schema = contracts.response_schema(key)
    assert schema["$schema"] == DRAFT
    for example in schema.get("examples", []):
        assert contracts.response_errors(key, example) == []


def test_index_names_only_vendored_files() -> None:
    index = contracts.index()
    for provider in index["providers"].values():
        for ref in provider["responses"]:
            assert ref.removeprefix("routes/") in FILES
    for route in index["routes"]:
        for ref in (route["request"], route["result"]):
            assert ref is None or ref.removeprefix("routes/") in FILES


@pytest.mark.parametrize(
    "provider,route,request_file,result_file",
    [
        ("bfl", "flux-kontext-max", "bfl.flux-kontext-max", "bfl.get_result"),
        (
            "replicate",
            "black-forest-labs/flux-kontext-pro",
            "replicate.black-forest-labs__flux-kontext-pro",
            "replicate.prediction",
        ),
        ("replicate", "flux-kontext-apps/multi-image-kontext-max", None, "replicate.prediction"),  # undocumented
        (
            "fal",
            "fal-ai/flux-pro/kontext/max/multi",
            "fal.fal-ai__flux-pro__kontext__max__multi",
            "fal.kontext-t2i-multi.result",
        ),
        ("fal", "fal-ai/flux-kontext/dev", "fal.fal-ai__flux-kontext__dev", "fal.kontext-dev.result"),
        ("fireworks", "flux-kontext-pro", "fireworks.flux-kontext-pro", "fireworks.get_result"),
        ("fal", "fal-ai/no-such-route", None, None),
    ],
)
def test_route_keys_from_the_index(
    provider: str, route: str, request_file: str | None, result_file: str | None
) -> None:
    assert contracts.request_key(provider, route) == request_file
    assert contracts.result_key(provider, route) == result_file


def test_an_unknown_field_is_reported_by_its_path() -> None:
    assert contracts.request_errors("bfl.flux-kontext-pro", {"prompt": "x", "enhance_prompt": True}) == [
        "enhance_prompt: not a field of this route"
    ]
    body = {"input": {"prompt": "x", "input_image_1": "a", "input_image_2": "b", "prompt_upsampling": True}}
    [problem] = contracts.request_problems("replicate.flux-kontext-apps__multi-image-kontext-pro", body)
    assert problem == Problem(("input", "prompt_upsampling"), "additionalProperties", "not a field of this route")
    # Each extra field is its own problem (pro has prompt_upsampling); the envelope is closed too.
    assert contracts.request_errors("replicate.black-forest-labs__flux-kontext-pro", {**body, "wait": 5}) == [
        "input.input_image_1: not a field of this route",
        "input.input_image_2: not a field of this route",
        "wait: not a field of this route",
    ]


def test_a_wrong_type_is_reported_by_its_path() -> None:
    # fal's pro/max take safety_tolerance as a string: one problem for the field (type, not enum too).
    [problem] = contracts.request_problems(
        "fal.fal-ai__flux-pro__kontext__text-to-image", {"prompt": "x", "safety_tolerance": 2}
    )
    assert problem.where == "safety_tolerance" and problem.keyword == "type" and "'string'" in problem.message
    errors = contracts.request_errors("fal.fal-ai__flux-pro__kontext__multi", {"prompt": "x", "image_urls": ["a", 3]})
    assert errors == ["image_urls[1]: 3 is not of type 'string'"]
    # A value of the right type that no anyOf branch takes names what the closest branch wanted.
    assert contracts.request_errors("bfl.flux-kontext-pro", {"prompt": "x", "output_format": "gif"}) == [
        "output_format: 'gif' is not one of ['jpeg', 'png', 'webp']"
    ]
    assert contracts.request_errors("fireworks.get_result", ["id"]) == ["(body): ['id'] is not of type 'object'"]


def test_missing_fields_and_conditional_caps() -> None:
    assert contracts.request_errors("fal.fal-ai__flux-kontext__dev", {}) == [
        "image_url: required, missing",
        "prompt: required, missing",
    ]
    body = {"prompt": "x", "input_image": "https://example.com/a.png", "safety_tolerance": 4}
    [cap] = contracts.request_problems("fireworks.flux-kontext-pro", body)
    assert cap.where == "safety_tolerance" and cap.keyword == "maximum" and cap.conditional
    assert contracts.request_problems("fireworks.flux-kontext-pro", {**body, "input_image": None}) == []
    [plain] = contracts.request_problems("fireworks.flux-kontext-pro", {"prompt": "x", "safety_tolerance": 7})
    assert plain.keyword == "maximum" and not plain.conditional


def test_responses_are_open_but_typed() -> None:
    ready = {"id": "t", "status": "Ready", "result": {"sample": "https://x/1.png"}, "new_field": 1}
    assert contracts.response_errors("bfl.get_result", ready) == []
    assert contracts.response_errors("bfl.get_result", {**ready, "status": "Generating"}) == [
        "status: 'Generating' is not one of "
        "['Task not found', 'Pending', 'Request Moderated', 'Content Moderated', 'Ready', 'Error']"
    ]
    assert "request_id: required, missing" in contracts.response_errors("fal.queue.submit", {"status": "IN_QUEUE"})


def test_unknown_keys_and_copies() -> None:
    with pytest.raises(KeyError, match=r"no request schema 'bfl\.nope'"):
        contracts.route_schema("bfl.nope")
    with pytest.raises(KeyError, match=r"no response schema 'bfl\.flux-kontext-pro'"):
        contracts.response_errors("bfl.flux-kontext-pro", {})
    schema = contracts.route_schema("bfl.flux-kontext-pro")
    schema["properties"].clear()  # a caller's copy: the vendored schema stays as published
    assert "prompt" in contracts.route_schema("bfl.flux-kontext-pro")["properties"]
    assert contracts.request_errors("bfl.flux-kontext-pro", {"prompt": "x"}) == []


def test_a_valid_body_is_judged_by_the_quick_validator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # jsonschema explains only the bodies jsonschema-rs finds invalid (and those it cannot read).
    explained: list[object] = []
    explain = contracts._problems

    def counting(validator: Draft202012Validator, body: object) -> list[Problem]:
        explained.append(body)
        return explain(validator, body)

    monkeypatch.setattr(contracts, "_problems", counting)
    route = routes.route("bfl", "flux-kontext-pro")
    good = {"prompt": "a fox", "aspect_ratio": "1:1", "output_format": "jpeg", "seed": 3}
    assert route.problems(good) == [] and explained == []
    bad = {"prompt": "a fox", "output_format": "gif"}
    assert [p.where for p in route.problems(bad)] == ["output_format"] and explained == [bad]
    unreadable = {"prompt": b"bytes are no JSON"}  # jsonschema-rs refuses to read it: jsonschema says why
    assert [p.where for p in route.problems(unreadable)] == ["prompt"] and explained[-1] is unreadable


# -- the quick validator against jsonschema, on bodies made around every vendored schema ------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)


def _resolve(schema: object, root: dict) -> dict:
    while isinstance(schema, dict) and "$ref" in schema and schema["$ref"].startswith("#/"):
        target: object = root
        for part in schema["$ref"][2:].split("/"):
            target = target[part]  # type: ignore[index]
        schema = target
    return schema if isinstance(schema, dict) else {}


def _fitting(schema: object, root: dict, depth: int = 0) -> st.SearchStrategy[object]:
    """Values `schema` takes: its enum values, numbers within its bounds, strings within its lengths,
    objects and arrays after its properties and items, whatever its anyOf / oneOf / allOf branches take."""
    schema = _resolve(schema, root)
    options: list[st.SearchStrategy[object]] = []
    if "enum" in schema:
        options.append(st.sampled_from(schema["enum"]))
    if "const" in schema:
        options.append(st.just(schema["const"]))
    kinds = schema.get("type", [])
    options.extend(_of_type(kind, schema, root, depth) for kind in (kinds if isinstance(kinds, list) else [kinds]))
    if depth < 4:
        for branch in ("anyOf", "oneOf", "allOf"):
            options.extend(_fitting(sub, root, depth + 1) for sub in schema.get(branch, []))
    return st.one_of(options) if options else JSON_SCALARS


def _outside(schema: object, root: dict) -> st.SearchStrategy[object]:
    """Values beside what `schema` takes: a bound passed by a little, a length by one, any JSON scalar."""
    schema = _resolve(schema, root)
    options: list[st.SearchStrategy[object]] = [JSON_SCALARS]
    bounds = [schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema]
    if bounds:
        options.append(st.sampled_from([b + d for b in bounds for d in (-1, -0.5, 0, 0.5, 1)]))
    lengths = [schema[k] for k in ("minLength", "maxLength") if k in schema]
    if lengths:
        options.append(st.sampled_from([max(0, n + d) for n in lengths for d in (-1, 0, 1)]).map(lambda n: "x" * n))
    return st.one_of(options)


def _of_type(kind: str, schema: dict, root: dict, depth: int) -> st.SearchStrategy[object]:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if kind == "integer":
        return st.integers(
            min_value=None if low is None else math.ceil(low), max_value=None if high is None else math.floor(high)
        )
    if kind == "number":
        return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 20), 20))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array" and depth < 4:
        items = _fitting(schema.get("items", {}), root, depth + 1)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 3), 3))
    if kind == "object" and depth < 4:
        return _objects(schema, root, depth + 1)
    return JSON_SCALARS


@st.composite
def _objects(draw: st.DrawFn, schema: dict, root: dict, depth: int = 0) -> dict[str, object]:
    """An object after the schema's properties (its required ones, any of the others) and, half the
    time, one step beside it: a value outside what its field takes, a required field left out, or a
    field it does not declare. Bodies on either side of the line are where two validators may differ."""
    props = schema.get("properties", {})
    required = [name for name in schema.get("required", []) if name in props]
    chosen = required + [n for n in props if n not in required and draw(st.booleans())]
    body = {name: draw(_fitting(props[name], root, depth + 1)) for name in chosen}
    step = draw(st.sampled_from(["none", "none", "none", "outside", "missing", "undeclared"]))
    if step == "outside" and chosen:
        name = draw(st.sampled_from(chosen))
        body[name] = draw(_outside(props[name], root))
    elif step == "missing" and required:
        del body[draw(st.sampled_from(required))]
    elif step == "undeclared":
        body["not_declared"] = draw(JSON_SCALARS)
    return body


@pytest.mark.parametrize("name", [n for n in FILES if n.endswith(".schema.json")])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_jsonschema_rs_and_jsonschema_agree_on_every_vendored_schema(name: str, data: st.DataObject) -> None:
    schema = json.loads((resources.files(contracts.__name__) / "routes" / name).read_text())
    body = data.draw(_objects(schema, schema) if "properties" in schema else _fitting(schema, schema))
    python_says = not list(Draft202012Validator(schema).iter_errors(body))
    assert contracts._quick_validator(name).is_valid(body) == python_says, (name, body)


PROBES: list[object] = [None, True, False, 0, 1, -1, 1.5, 2**64, "", "x", "1:1", [], [1], ["x"], {}, {"a": 1}]


def _probes(schema: dict) -> list[object]:
    """Values on and beside what one field takes: its enum's values and a near miss, its bounds and a
    little past them, lengths one off, and one value of every JSON type."""
    found = [*PROBES, *schema.get("enum", [])]
    if schema.get("enum"):
        found.append(str(schema["enum"][0]) + "x")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema:
            found += [schema[key] + d for d in (-1, -0.5, 0, 0.5, 1)]
    for key in ("minLength", "maxLength"):
        if key in schema:
            found += ["x" * max(0, schema[key] + d) for d in (-1, 0, 1)]
    for key in ("minItems", "maxItems"):
        if key in schema:
            found += [["x"] * max(0, schema[key] + d) for d in (-1, 0, 1)]
    return found


def _variants(body: dict, schema: dict, root: dict) -> list[dict]:
    """`body` with one change each: every field set to each of its probes, left out, and a field the
    schema does not declare added; the same inside every nested object the schema describes."""
    schema = _resolve(schema, root)
    props = schema.get("properties", {})
    out: list[dict] = [{**body, "not_declared": 1}]
    for name, value in body.items():
        out.append({k: v for k, v in body.items() if k != name})
        sub = _resolve(props.get(name, {}), root)
        for branch in [sub, *(_resolve(b, root) for b in sub.get("anyOf", []) + sub.get("oneOf", []))]:
            out += [{**body, name: probe} for probe in _probes(branch)]
            if isinstance(value, dict) and "properties" in branch:
                out += [{**body, name: inner} for inner in _variants(value, branch, root)]
    return out


@pytest.mark.parametrize("name", [n for n in FILES if n.endswith(".schema.json")])
def test_jsonschema_rs_and_jsonschema_agree_one_step_from_every_example(name: str) -> None:
    schema = json.loads((resources.files(contracts.__name__) / "routes" / name).read_text())
    python = Draft202012Validator(schema)
    checked = 0
    for example in schema["examples"]:
        for body in _variants(example, schema, schema):
            python_says = not list(python.iter_errors(body))
            assert contracts._quick_validator(name).is_valid(body) == python_says, (name, body)
            checked += 1
    assert checked > 10
