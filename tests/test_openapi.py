"""/openapi.json says what the routes really take and answer.

The routes read their bodies themselves, so the document's bodies and errors come from
api/openapi.py: every route that takes a body documents it, every error is the OpenAI envelope, and
no route promises FastAPI's 422 "Validation Error" (validation errors are 400s). Whether live answers
match the document is test_schemathesis.py's part.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kontext_gateway.api.app import create_app
from kontext_gateway.config import Settings
from kontext_gateway.protocol import ImageRequest

METHODS = ("get", "post", "put", "patch", "delete")
# What a route answers 422 for, in the envelope: Replicate's webhook errors, a reused Idempotency-Key.
REAL_422 = {
    ("post", "/v1/images/generations"),
    ("post", "/v1/images/edits"),
    ("post", "/v1/predictions"),
    ("post", "/v1/models/{owner}/{name}/predictions"),
}
TAKES_NO_BODY = {("post", "/v1/predictions/{rid}/cancel")}


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = tmp_path_factory.mktemp("openapi")
    return create_app(Settings(data_dir=data, database_url=f"sqlite:///{data / 'gateway.db'}")).openapi()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield method, path, op


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.removeprefix("#/components/schemas/")] if ref else schema


def test_every_route_that_takes_a_body_documents_it(doc: dict[str, Any]) -> None:
    writes = [(m, p, op) for m, p, op in operations(doc) if m in ("post", "put", "patch")]
    assert len(writes) >= 8
    for method, path, op in writes:
        if (method, path) in TAKES_NO_BODY:
            assert "requestBody" not in op, path
            continue
        content = op.get("requestBody", {}).get("content")
        assert content, f"{method.upper()} {path} documents no request body"
        assert set(content) <= {"application/json", "multipart/form-data"}, (path, set(content))
        for media in content.values():
            assert resolve(doc, media["schema"]).get("type") == "object", (path, media)


def test_request_bodies_are_the_models_the_handlers_read(doc: dict[str, Any]) -> None:
    paths = doc["paths"]

    def body(path: str, method: str = "post") -> dict[str, Any]:
        return paths[path][method]["requestBody"]["content"]

    generation = resolve(doc, body("/v1/images/generations")["application/json"]["schema"])
    assert set(generation["properties"]) == set(ImageRequest.model_json_schema()["properties"])
    assert generation["required"] == ["prompt"]
    edits = body("/v1/images/edits")
    assert resolve(doc, edits["application/json"]["schema"]) == generation
    form = edits["multipart/form-data"]["schema"]
    assert {"image", "prompt"} <= set(form["required"])
    assert form["properties"]["image"]["items"] == {"type": "string", "format": "binary"}
    assert form["properties"]["mask"]["format"] == "binary"
    assert "images" not in form["properties"]  # JSON only: a list of objects is no form field
    upload = body("/v1/files")["multipart/form-data"]["schema"]
    assert upload["required"] == ["content"] and upload["properties"]["content"]["format"] == "binary"
    for path in ("/v1/predictions", "/v1/models/{owner}/{name}/predictions"):
        prediction = resolve(doc, body(path)["application/json"]["schema"])
        assert prediction["required"] == ["input"]
        assert {"model", "version", "input", "webhook", "webhook_events_filter"} <= set(prediction["properties"])
    create = resolve(doc, body("/v1/admin/keys")["application/json"]["schema"])
    assert create["required"] == ["name"] and create["additionalProperties"] is False
    update = resolve(doc, body("/v1/admin/keys/{key_id}", "patch")["application/json"]["schema"])
    assert "name" not in update["properties"] and update["additionalProperties"] is False
    assert paths["/v1/admin/keys/{key_id}"]["patch"]["requestBody"]["required"] is False  # empty: nothing changes


def test_no_operation_promises_fastapis_validation_error(doc: dict[str, Any]) -> None:
    for method, path, op in operations(doc):
        if "422" in op["responses"]:
            assert (method, path) in REAL_422, f"{method.upper()} {path} documents a 422 it never answers"
            assert op["responses"]["422"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"
            }
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "ValidationError" not in doc["components"]["schemas"]


def test_every_error_response_is_the_envelope(doc: dict[str, Any]) -> None:
    envelope = doc["components"]["schemas"]["ErrorResponse"]
    detail = resolve(doc, envelope["properties"]["error"])
    assert envelope["required"] == ["error"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    seen = set()
    for method, path, op in operations(doc):
        errors = {s: r for s, r in op["responses"].items() if int(s) >= 400}
        assert errors, f"{method.upper()} {path} documents no error"
        for status, response in errors.items():
            seen.add(int(status))
            assert response["content"] == {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
            }, (method, path, status)
            assert response["description"], (method, path, status)
    assert {400, 401, 402, 403, 404, 409, 413, 415, 429, 499, 502, 503} <= seen


def test_statuses_by_route(doc: dict[str, Any]) -> None:
    def statuses(path: str, method: str = "get") -> set[int]:
        return {int(s) for s in doc["paths"][path][method]["responses"]}

    assert {200, 400, 401, 402, 403, 413, 415, 429, 499, 502, 503} <= statuses("/v1/images/generations", "post")
    assert {200, 201, 400, 401, 402, 413, 415, 422, 429, 503} <= statuses("/v1/predictions", "post")
    assert 502 not in statuses("/v1/predictions", "post")  # its failures are in the prediction
    assert statuses("/v1/files", "post") == {201, 400, 401, 403, 413, 415}
    assert statuses("/v1/predictions/{rid}") == {200, 400, 401, 404}
    assert statuses("/v1/admin/keys", "post") == {201, 400, 401, 403, 404, 413, 415}
    assert statuses("/v1/requests/{rid}/payloads", "delete") == {200, 400, 401, 403, 404, 409}


def test_success_bodies_are_documented(doc: dict[str, Any]) -> None:
    def schema(path: str, method: str, status: str) -> dict[str, Any]:
        return doc["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]

    images = schema("/v1/images/generations", "post", "200")
    assert {resolve(doc, s)["title"] for s in images["anyOf"]} == {"ImagesResponse", "CostEstimate"}
    assert "text/event-stream" in doc["paths"]["/v1/images/generations"]["post"]["responses"]["200"]["content"]
    assert resolve(doc, schema("/v1/predictions", "post", "201"))["title"] == "Prediction"
    assert resolve(doc, schema("/v1/files", "post", "201"))["title"] == "FileObject"
    assert "key" in resolve(doc, schema("/v1/admin/keys", "post", "201"))["required"]


def test_api_routes_say_they_take_a_bearer_key(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`kontext keys create`).",
    }
    for method, path, op in operations(doc):
        keyed = path.startswith("/v1/") and not path.startswith("/v1/blobs/")
        assert (op.get("security") == [{"bearer": []}]) is keyed, (method, path)


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(doc))
    assert "#/components/schemas/ImageRequest" in found
    for ref in found:
        assert ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"], ref


def test_the_server_serves_the_document(http: httpx.Client, doc: dict[str, Any]) -> None:
    served = http.get("/openapi.json")
    assert served.status_code == 200
    assert served.json()["paths"].keys() == doc["paths"].keys()
    assert "422" not in served.json()["paths"]["/v1/requests"]["get"]["responses"]
