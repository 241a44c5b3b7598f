"""What the model pages show beside the catalog: per provider success rate and latency as observed,
and a prediction's step progress while the local engine runs it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from conftest import running_server
from fakes.upstreams import Upstreams
from kontext_gateway.config import Settings


def test_stats_count_attempts_per_provider(upstreams: Upstreams, tmp_path: Path) -> None:
    upstreams.reset()
    settings = upstreams.settings(
        tmp_path, provider_priority={"fal": 0, "bfl": 1, "fireworks": 2, "replicate": 3}, upstream_retries=0
    )
    with running_server(settings) as base:

        def gen() -> None:
            resp = httpx.post(
                base + "/v1/images/generations", json={"model": "flux.1-kontext-pro", "prompt": "x"}, timeout=60
            )
            assert resp.status_code == 200, resp.text

        gen()
        upstreams.fal.faults.add("503", at="submit")  # fal fails once: BFL serves that one
        gen()
        gen()
        stats = httpx.get(base + "/v1/models/flux-kontext-pro/stats").json()  # an alias works
        unknown = httpx.get(base + "/v1/models/nope/stats")
        bad = httpx.get(base + "/v1/models/kontext-tiny/stats?days=0")
    assert stats["object"] == "model_stats" and stats["model"] == "flux.1-kontext-pro" and stats["requests"] == 3
    by_key = {p["config_key"]: p for p in stats["providers"]}
    assert set(by_key) == {
        "replicate/flux.1-kontext-pro",
        "fireworks/flux.1-kontext-pro",
        "fal/flux.1-kontext-pro",
        "bfl/flux.1-kontext-pro",
    }  # every provider of the model, observed or not
    fal, bfl = by_key["fal/flux.1-kontext-pro"], by_key["bfl/flux.1-kontext-pro"]
    assert (fal["attempts"], fal["succeeded"], fal["failed"]) == (3, 2, 1) and fal["success_rate"] == pytest.approx(
        2 / 3, abs=1e-4
    )
    assert (bfl["attempts"], bfl["success_rate"]) == (1, 1.0)
    assert 0 <= fal["latency_ms"]["p50"] <= fal["latency_ms"]["p95"]
    assert by_key["replicate/flux.1-kontext-pro"]["success_rate"] is None
    assert by_key["replicate/flux.1-kontext-pro"]["latency_ms"] is None
    assert fal["price_per_image"] == 0.04 and fal["currency"] == "USD"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "days"


def test_a_running_prediction_shows_its_denoising_steps(tmp_path: Path) -> None:
    with running_server(Settings(data_dir=tmp_path)) as base:
        created = httpx.post(
            base + "/v1/predictions",
            json={"model": "kontext-tiny", "input": {"prompt": "x", "size": "1024x1024", "num_inference_steps": 12}},
        ).json()
        seen: list[dict[str, int]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            p = httpx.get(base + f"/v1/predictions/{created['id']}").json()
            if "progress" in p:
                seen.append(p["progress"])
                assert f"denoising step {p['progress']['step']}/12" in p["logs"]  # Replicate clients read logs
            if p["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.02)
        request = httpx.get(base + f"/v1/requests/{created['id']}").json()
    assert p["status"] == "succeeded" and "progress" not in p  # only while it runs
    assert seen and all(s["total"] == 12 and 1 <= s["step"] <= 12 for s in seen)
    assert [s["step"] for s in seen] == sorted(s["step"] for s in seen)
    assert isinstance(request["settings"]["seed"], int) and request["settings"]["size"] == "1024x1024"
    assert request["settings"]["num_inference_steps"] == 12 and request["mode"] == "text-to-image"


def test_static_files_revalidate_and_predictions_take_x_provider(tmp_path: Path) -> None:
    with running_server(Settings(data_dir=tmp_path)) as base:
        page = httpx.get(base + "/")
        module = httpx.get(base + "/static/app.js")
        forced = httpx.post(
            base + "/v1/predictions",
            headers={"x-provider": "fal", "prefer": "wait"},
            json={"model": "kontext-tiny", "input": {"prompt": "x", "size": "32x32"}},
        )
        local = httpx.post(
            base + "/v1/predictions",
            headers={"x-provider": "local", "prefer": "wait"},
            json={"model": "kontext-tiny", "input": {"prompt": "x", "size": "32x32"}},
        )
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert module.status_code == 200 and module.headers["cache-control"] == "no-cache"
    assert forced.status_code == 400 and forced.json()["error"]["code"] == "provider_not_found"
    assert local.status_code == 201 and local.json()["status"] == "succeeded"
