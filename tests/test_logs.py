"""Logs: JSON lines from a real `kontext serve` process, each finished job logged with its request id,
secrets never written (the redaction safety net, unit-tested too); `x-request-id` sent upstream."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import png_bytes, running_server, wait_healthy
from fakes.common import free_port, serve
from fakes.fal import FakeFal
from kontext_gateway import logs
from kontext_gateway.config import Settings

FAL_SECRET = "fal-secret-7f3a9c2e-value"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KEY = "kx-live_4f9d2c7b1a8e6f3d5c0b9a7e"
ADMIN_KEY = "admin-0b5e9c1d7a3f-operator"


def _formatted(
    logger_name: str, *, json_lines: bool = True, secrets: tuple[str, ...] = ()
) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.Formatter(json=json_lines, secrets=secrets))
    logger = logging.getLogger(logger_name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_redaction() -> None:
    redact = logs.Redactor([FAL_SECRET, "short"])
    text = (
        f"Authorization: Bearer {KEY} key={KEY} fal={FAL_SECRET} hook={WEBHOOK_SECRET} "
        "token=r8_AbCdEf0123 bearer abc.def short"
    )
    out = redact(text)
    for secret in (KEY, FAL_SECRET, WEBHOOK_SECRET, "r8_AbCdEf0123", "abc.def"):
        assert secret not in out
    assert out.count("[redacted]") == 6 and out.endswith("short")  # too short to be treated as a secret
    assert redact("kx-short and a plain sentence") == "kx-short and a plain sentence"


def test_json_lines_carry_bound_context_and_stay_valid_when_redacted() -> None:
    log, out = _formatted("kontext_test.json", secrets=(FAL_SECRET,))
    with logs.bind(request_id="req_1", key_id="key_a"):
        with logs.bind(provider="fal"):
            log.info('upstream said "%s"', f'Bearer {KEY}"}}', extra={"outcome": "failed"})
        log.warning("after")
    log.info("outside")
    try:
        raise RuntimeError(f"boom {FAL_SECRET}")
    except RuntimeError:
        log.exception("crashed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["request_id"] == "req_1" and lines[0]["key_id"] == "key_a" and lines[0]["provider"] == "fal"
    # The token ran to the next space, quote and brace included; the line is still valid JSON.
    assert lines[0]["outcome"] == "failed" and lines[0]["message"] == 'upstream said "[redacted]'
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "kontext_test.json" and lines[0]["ts"].endswith("Z")
    assert lines[1]["request_id"] == "req_1" and "provider" not in lines[1]
    assert "request_id" not in lines[2]
    assert "RuntimeError: boom [redacted]" in lines[3]["exc_info"]
    assert FAL_SECRET not in out.getvalue() and KEY not in out.getvalue()


def test_text_format_appends_context() -> None:
    log, out = _formatted("kontext_test.text", json_lines=False)
    with logs.bind(request_id="req_2"):
        log.info("hello %s", f"Bearer {KEY}")
    line = out.getvalue().strip()
    assert line.endswith("INFO kontext_test.text: hello [redacted] request_id=req_2")


def test_choose_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONTEXT_LOG_FORMAT", "text")
    assert logs.choose_format() == "text" and logs.choose_format("json") == "json"
    monkeypatch.delenv("KONTEXT_LOG_FORMAT")
    assert logs.choose_format() == ("text" if sys.stderr.isatty() else "json")


def test_settings_secrets() -> None:
    s = Settings(fal_key=FAL_SECRET, webhook_secret=WEBHOOK_SECRET, url_secret="u" * 32, replicate_api_token=None)
    assert {FAL_SECRET, WEBHOOK_SECRET, "u" * 32} <= set(logs.settings_secrets(s))


# -- a real server process ------------------------------------------------------------------------------------


def test_server_logs_are_json_with_request_ids_and_no_secrets(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "FAL_KEY": FAL_SECRET,
        "KONTEXT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "REPLICATE_API_TOKEN": "r8_SecretReplicateToken01",
        "KONTEXT_URL_SECRET": "url-signing-secret-0123456789",
        "KONTEXT_ADMIN_KEY": ADMIN_KEY,
    }
    env.pop("KONTEXT_LOG_FORMAT", None)
    # Debug: uvicorn's access log is on, so request lines (query strings included) are logged too.
    with open(tmp_path / "stderr", "wb") as stderr:  # the server keeps its own copy
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kontext_gateway",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path),
                "--log-format",
                "json",
                "--log-level",
                "debug",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    ids = []
    try:
        wait_healthy(url, proc, tmp_path / "stderr")
        made = httpx.post(
            f"{url}/v1/admin/keys", json={"name": "team"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        real_key, key_id = made.json()["key"], made.json()["id"]
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
        auth = {"Authorization": f"Bearer {real_key}"}
        with httpx.Client(base_url=url, timeout=120, headers=auth) as http:
            for body in (
                {"model": "kontext-tiny", "prompt": "a fox", "size": "64x64"},
                {"model": "kontext-tiny", "prompt": "x", "n": 0},
            ):
                resp = http.post("/v1/images/generations", json=body)
                ids.append((resp.status_code, resp.headers["x-request-id"]))
            resp = http.post(
                "/v1/images/edits",
                data={"model": "kontext-tiny", "prompt": "night", "size": "64x48"},
                files={"image": ("in.png", png_bytes(64, 48), "image/png")},
            )
            ids.append((resp.status_code, resp.headers["x-request-id"]))
            # A secret in a query string reaches the access log: it must come out redacted.
            assert http.get("/v1/models", params={"token": KEY, "other": FAL_SECRET}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert [status for status, _ in ids] == [200, 400, 200]
    text = (tmp_path / "stderr").read_text()
    for secret in (
        FAL_SECRET,
        WEBHOOK_SECRET,
        KEY,
        real_key,
        ADMIN_KEY,
        "r8_SecretReplicateToken01",
        "url-signing-secret-0123456789",
    ):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    finished = {line["request_id"]: line for line in lines if line["message"].startswith("job ")}
    for _status, rid in (ids[0], ids[2]):
        assert finished[rid]["outcome"] == "succeeded" and finished[rid]["provider"] == "local/kontext-tiny"
        assert finished[rid]["key_id"] == key_id  # the key's id, never the key
    assert any("[redacted]" in line["message"] and line["logger"] == "uvicorn.access" for line in lines)


# -- x-request-id upstream ----------------------------------------------------------------------------------------


@pytest.fixture
def fal_gateway(tmp_path: Path) -> Iterator[tuple[FakeFal, str]]:
    fake = FakeFal()
    with serve(fake.app) as fake_url:
        settings = Settings(
            data_dir=tmp_path,
            database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
            fal_key="fal_test",
            fal_base_url=fake_url,
            replicate_api_token=None,
            fireworks_api_key=None,
            bfl_api_key=None,
            upstream_poll_interval_s=0.01,
        )
        with running_server(settings) as url:
            yield fake, url


def test_upstream_calls_carry_the_request_id(fal_gateway: tuple[FakeFal, str]) -> None:
    fake, url = fal_gateway
    resp = httpx.post(
        f"{url}/v1/images/generations",
        timeout=60,
        json={"model": "fal/flux.1-kontext-pro", "prompt": "a fox", "response_format": "b64_json"},
    )
    assert resp.status_code == 200, resp.text
    rid = resp.headers["x-request-id"]
    calls = [(method, path, headers) for method, path, headers, _ in fake.requests if not path.startswith("/results/")]
    assert any(method == "POST" for method, _, _ in calls)  # the submit
    assert calls and all(headers.get("x-request-id") == rid for _, _, headers in calls)
