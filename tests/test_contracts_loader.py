"""The vendored upstream contracts (kontext_gateway.providers.contracts): every file loads and is a valid
JSON Schema 2020-12, index.json names only files that are there, and the validators name the field
that breaks a schema: an unknown one, a wrong type, a missing one, a conditional cap."""

from __future__ import annotations

import json
from importlib import resources

import pytest
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


def test_a_routes_verdict_is_the_schemas_and_a_small_body_is_validated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A request's body is judged when it is accepted and again when its job runs: the second time is
    # remembered, and what it answers is what the schema says, every time.
    route = routes.route("bfl", "flux-kontext-pro")
    validated: list[object] = []

    def counting(key: str, body: object) -> list[Problem]:
        validated.append(body)
        return contracts.request_problems(key, body)

    monkeypatch.setattr(routes, "request_problems", counting)
    routes._problems_of.cache_clear()
    good = {"prompt": "a fox #1", "aspect_ratio": "1:1", "output_format": "jpeg"}
    bad = {"prompt": "a fox #2", "output_format": "gif"}
    assert route.problems(good) == [] and route.problems(dict(good)) == []
    first = route.problems(bad)
    assert [p.where for p in first] == ["output_format"] and first == contracts.request_problems(route.key, bad)
    first.clear()  # the caller's own list: the verdict kept is not changed through it
    assert route.problems(bad) == contracts.request_problems(route.key, bad)
    assert len(validated) == 2
    # Same fields, another value: a verdict of its own.
    assert [p.where for p in route.problems({**good, "output_format": "bmp"})] == ["output_format"]
    assert len(validated) == 3
    # A body carrying an inline image is not kept (it would hold megabytes): validated every time.
    inline = {"prompt": "x", "input_image": "data:image/png;base64," + "A" * 20_000}
    assert route.problems(inline) == route.problems(inline) == []
    assert len(validated) == 5
