"""Schemathesis over the gateway's own /openapi.json: requests built from the document, valid and
invalid, and every answer checked against it.

One pytest test per operation. The checks: no 5xx; the status is one the operation documents; the
content type too; and the body validates against the documented schema (every error against the
OpenAI envelope). A failure names the operation and the request; the server's traceback is in the
captured log.

Rules of the suite:
- Few examples an operation, derandomized: fast and the same on every run.
- A request that could really generate (not `dryRun=true`) is clamped to one 64x64 image at one or two
  steps before it is sent: the document allows sizes and step counts the CPU engine would take minutes on.
- Nothing leaves loopback: a URL whose host is a name (webhooks, input images) is swapped for a
  loopback one before it is sent, as the gateway would look the name up.
- The gateway runs with an admin key, sent on every request: keys created by the tests never lock it.
- SQLite only, to stay fast: test_hostile_input.py runs its hostile values on PostgreSQL too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import running_server
from kontext_gateway.api.app import create_app
from kontext_gateway.config import Settings

ADMIN = "kx-schemathesis-admin-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
CONFIG = {
    "generation": {"mode": "all", "max-examples": 12, "deterministic": True, "database": "none"},
    # The examples and fuzzing phases; the coverage phase's boundary values of every field cost
    # minutes, and the hostile-input suite covers those values.
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
}
CREATES = {"/v1/images/generations", "/v1/images/edits", "/v1/predictions", "/v1/models/{owner}/{name}/predictions"}
LOOPBACK = "http://127.0.0.1:9/"


def _document() -> dict[str, Any]:
    """The document as the app builds it (nothing is started: the lifespan does not run)."""
    with tempfile.TemporaryDirectory() as data:
        return create_app(Settings(data_dir=data, database_url=f"sqlite:///{data}/gateway.db")).openapi()


# Loaded when the module is collected (schemathesis' fixture-based loader does not run on pytest 9).
schema = schemathesis.openapi.from_dict(_document(), config=SchemathesisConfig.from_dict(CONFIG))


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("schemathesis")
    config = Settings(data_dir=data, database_url=f"sqlite:///{data / 'gateway.db'}", admin_key=ADMIN)
    with running_server(config) as url:
        yield url


@schema.parametrize()
def test_operation(case: Any, gateway_url: str) -> None:
    if case.operation.path in CREATES and _runs(case):
        _clamp(case)
    if isinstance(case.body, (dict, list, str)):
        case.body = _loopback_only(case.body)
    case.call_and_validate(
        base_url=gateway_url, headers={"Authorization": f"Bearer {ADMIN}"}, checks=CHECKS, timeout=60
    )


def _runs(case: Any) -> bool:
    """Whether the request would really generate: not a dry run."""
    return str((case.query or {}).get("dryRun", "")).lower() not in ("true", "1")


def _clamp(case: Any) -> None:
    """One 64x64 image at one or two steps, whatever else the request says."""
    fields = case.body
    if isinstance(fields, dict) and isinstance(fields.get("input"), dict):
        fields = fields["input"]  # a prediction's input
    if not isinstance(fields, dict):
        return
    for name in ("aspect_ratio", "resolution", "stream", "partial_images"):
        fields.pop(name, None)
    fields["size"] = "64x64"
    steps = fields.get("num_inference_steps")
    fields["num_inference_steps"] = steps if steps in (1, 2, "1", "2") else 1
    for name in ("n", "num_outputs"):
        if name in fields:
            fields[name] = 1


def _loopback_only(value: Any) -> Any:
    if isinstance(value, str):
        return LOOPBACK if _reaches_out(value) else value
    if isinstance(value, dict):
        return {k: _loopback_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_loopback_only(v) for v in value]
    return value


def _reaches_out(text: str) -> bool:
    """Whether the gateway, parsing `text` as it does (urlsplit), would look up or connect to a host
    other than loopback."""
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and host not in (None, "", "127.0.0.1", "::1")
