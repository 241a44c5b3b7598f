"""Budgets, rate limits and the cost ledger, through a real server.

429 (requests / images per minute, concurrency) and 402 (budget) with their exact envelopes and
headers; 50 parallel requests at a budget that fits 10 (SQLite and PostgreSQL); after a mixed run
with retries, failover, billed failures and `n` fan-out, the ledger, the keys' spend and the
requests' costs agree to the micro-dollar; `dryRun` estimates equal what successful requests cost.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import png_bytes, running_server, throwaway_postgres_database
from fakes.upstreams import Upstreams
from kontext_gateway.config import Settings

TINY = {"model": "kontext-tiny", "prompt": "a kite", "size": "32x32"}


def make_key(base: str, headers: dict[str, str] | None = None, **limits: Any) -> dict[str, Any]:
    resp = httpx.post(base + "/v1/admin/keys", headers=headers or {}, json={"name": "k", **limits})
    assert resp.status_code == 201, resp.text
    return resp.json()


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {key['key']}"}


def show(base: str, key: dict[str, Any], admin: dict[str, Any]) -> dict[str, Any]:
    return httpx.get(base + f"/v1/admin/keys/{key['id']}", headers=bearer(admin)).json()


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A gateway and its first key, an admin key (made while it was still open)."""
    with running_server(Settings(data_dir=tmp_path)) as base:
        yield base, make_key(base, admin=True)


def test_requests_per_minute_429(server: tuple[str, dict[str, Any]]) -> None:
    base, admin = server
    key = make_key(base, bearer(admin), rpm=2)
    client = openai.OpenAI(base_url=base + "/v1", api_key=key["key"], max_retries=0, timeout=60)
    for _ in range(2):
        client.images.generate(**TINY)
    with pytest.raises(openai.RateLimitError) as limited:
        client.images.generate(**TINY)
    client.close()
    resp = limited.value.response
    assert 1 <= int(resp.headers["retry-after"]) <= 60 and resp.headers["x-ratelimit-limit-requests"] == "2"
    assert "x-should-retry" not in resp.headers  # a 429 is worth retrying after retry-after
    err = resp.json()["error"]
    assert err == {"message": err["message"], "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    assert "2" in err["message"] and "requests per minute" in err["message"]
    # Only creations count: reading models or a key's own data is not limited.
    assert all(httpx.get(base + "/v1/models", headers=bearer(key)).status_code == 200 for _ in range(5))
    # Another key has its own allowance.
    assert httpx.post(base + "/v1/images/generations", headers=bearer(admin), json=TINY, timeout=60).status_code == 200


def test_images_per_minute_counts_n(server: tuple[str, dict[str, Any]]) -> None:
    base, admin = server
    key = make_key(base, bearer(admin), ipm=3)

    def post(n):
        return httpx.post(base + "/v1/images/generations", headers=bearer(key), json={**TINY, "n": n}, timeout=60)

    assert post(2).status_code == 200
    err = error_of(limited := post(2), 429)
    assert err["type"] == "images" and err["code"] == "rate_limit_exceeded"
    assert limited.headers["x-ratelimit-limit-images"] == "3" and int(limited.headers["retry-after"]) >= 1
    assert post(1).status_code == 200  # the denied request consumed nothing: 2 + 1 fit
    err = error_of(post(4), 400)  # can never fit: not a 429 to retry
    assert err["code"] == "n_above_rate_limit" and err["param"] == "n"


def test_concurrent_requests_429(server: tuple[str, dict[str, Any]]) -> None:
    base, admin = server
    key = make_key(base, bearer(admin), max_concurrent=1)
    slow = {"model": "kontext-tiny", "input": {"prompt": "x", "size": "1024x1024", "num_inference_steps": 8}}
    first = httpx.post(base + "/v1/predictions", headers=bearer(key), json=slow)
    assert first.status_code == 201
    second = httpx.post(base + "/v1/predictions", headers=bearer(key), json=slow)
    err = error_of(second, 429)
    assert err["code"] == "concurrency_limit_exceeded" and second.headers["retry-after"] == "1"
    deadline = time.monotonic() + 60
    while (
        status := httpx.get(base + f"/v1/predictions/{first.json()['id']}", headers=bearer(key)).json()["status"]
    ) not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == "succeeded"
    assert httpx.post(base + "/v1/predictions", headers=bearer(key), json=slow).status_code == 201


def test_budget_402_when_the_estimate_does_not_fit(server: tuple[str, dict[str, Any]]) -> None:
    base, admin = server
    key = make_key(base, bearer(admin), budget_usd=0.003, budget_period="day")
    ok = httpx.post(base + "/v1/images/generations", headers=bearer(key), json={**TINY, "n": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["metadata"]["cost"] == pytest.approx(0.002)
    refused = httpx.post(base + "/v1/images/generations", headers=bearer(key), json={**TINY, "n": 2}, timeout=60)
    err = error_of(refused, 402)
    assert err["type"] == "billing_error" and err["code"] == "insufficient_budget" and err["param"] is None
    assert "$0.0020" in err["message"] and "$0.0010" in err["message"] and "daily" in err["message"]
    assert refused.headers["x-should-retry"] == "false" and refused.headers["x-request-id"].startswith("req_")
    with (
        openai.OpenAI(base_url=base + "/v1", api_key=key["key"], max_retries=0) as client,
        pytest.raises(openai.APIStatusError) as sdk_err,  # the SDK surfaces it as a 402
    ):
        client.images.generate(**TINY, n=2)
    assert sdk_err.value.status_code == 402
    assert httpx.post(base + "/v1/images/generations", headers=bearer(key), json=TINY, timeout=60).status_code == 200
    view = show(base, key, admin)
    assert view["spent_usd"] == pytest.approx(0.003) and view["remaining_usd"] == 0 and view["reserved_usd"] == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_fifty_parallel_requests_cannot_overspend_a_budget_that_fits_ten(tmp_path: Path, backend: str) -> None:
    with ExitStack() as stack:
        url = stack.enter_context(throwaway_postgres_database("budget")) if backend == "postgresql" else None
        base = stack.enter_context(running_server(Settings(data_dir=tmp_path, database_url=url)))
        admin = make_key(base, admin=True)
        key = make_key(base, bearer(admin), budget_usd=0.010)  # ten kontext-tiny images at $0.001

        def one(i: int) -> httpx.Response:
            return httpx.post(
                base + "/v1/images/generations", headers=bearer(key), json={**TINY, "seed": i}, timeout=120
            )

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            responses = list(pool.map(one, range(50)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 10 + [402] * 40
        assert all(r.json()["error"]["code"] == "insufficient_budget" for r in responses if r.status_code == 402)
        assert all(len(r.json()["data"]) == 1 for r in responses if r.status_code == 200)
        view = show(base, key, admin)
        assert view["spent_usd"] == pytest.approx(0.010) and view["reserved_usd"] == 0
        assert view["total_spent_usd"] == pytest.approx(0.010) and view["remaining_usd"] == pytest.approx(0)


def test_dry_run_estimates_equal_settled_costs(server: tuple[str, dict[str, Any]]) -> None:
    base, admin = server
    key = make_key(base, bearer(admin), budget_usd=1)
    auth = bearer(key)
    image = base64.b64encode(png_bytes(40, 30)).decode()
    cases = [
        ("/v1/images/generations", {"json": {**TINY, "n": 3}}),
        (
            "/v1/images/edits",
            {
                "files": {"image": ("in.png", png_bytes(40, 30), "image/png")},
                "data": {"model": "kontext-tiny", "prompt": "night", "n": "2"},
            },
        ),
        (
            "/v1/predictions",
            {
                "json": {
                    "model": "kontext-tiny",
                    "input": {"prompt": "x", "input_image": f"data:image/png;base64,{image}", "num_outputs": 2},
                }
            },
        ),
    ]
    for path, body in cases:
        before = show(base, key, admin)["total_spent_usd"]
        dry = httpx.post(base + path + "?dryRun=true", headers=auth, timeout=60, **body)
        assert dry.status_code == 200, dry.text
        est = dry.json()
        assert est["estimated"] is True and est["provider"] == "local/kontext-tiny" and est["currency"] == "USD"
        (line,) = est["components"]
        assert line["quantity"] == est["n"] and line["unit_price"] == 0.001
        assert line["total_cost"] == est["total_cost_micros"] == 1000 * est["n"]
        assert est["budget"]["fits"] is True
        assert show(base, key, admin)["total_spent_usd"] == before  # nothing ran, nothing charged
        real = httpx.post(base + path, headers={**auth, "prefer": "wait"}, timeout=60, **body)
        assert real.status_code in (200, 201), real.text
        rid = real.json().get("id") or real.headers["x-request-id"]
        record = httpx.get(base + f"/v1/predictions/{rid}", headers=auth).json()
        assert record["status"] == "succeeded"
        cost = (real.json().get("metadata") or {}).get("cost")
        spent = show(base, key, admin)["total_spent_usd"] - before
        assert round(spent * 1e6) == est["total_cost_micros"]
        if cost is not None:
            assert round(cost * 1e6) == est["total_cost_micros"]
    # A dry run validates like the real request: the same 400.
    bad = httpx.post(base + "/v1/images/generations?dryRun=true", headers=auth, json={**TINY, "size": "0x0"})
    assert error_of(bad, 400)["param"] == "size"
    bad = httpx.post(base + "/v1/images/generations?dryRun=maybe", headers=auth, json=TINY)
    assert error_of(bad, 400)["param"] == "dryRun"


def test_dry_run_prices_hosted_models_without_keys(server: tuple[str, dict[str, Any]]) -> None:
    """No provider key is set: a real request is a 503, but the catalog knows the prices, so the
    dry run answers with the providers that would serve once configured, and the size they make."""
    base, admin = server
    auth = bearer(admin)
    body = {"model": "flux.1-kontext-pro", "prompt": "x", "size": "2048x2048", "n": 2}
    real = httpx.post(base + "/v1/images/generations", headers=auth, json=body, timeout=60)
    assert error_of(real, 503)["code"] == "provider_unavailable"
    dry = httpx.post(base + "/v1/images/generations?dryRun=true", headers=auth, json=body, timeout=60)
    assert dry.status_code == 200, dry.text
    est = dry.json()
    assert est["configured"] is False and "once configured" in est["message"]
    assert est["total_cost_micros"] == est["max_cost_micros"] == 2 * 40_000 and est["n"] == 2
    routes = {p["config_key"]: p for p in est["providers"]}
    assert set(routes) == {f"{p}/flux.1-kontext-pro" for p in ("replicate", "fireworks", "fal", "bfl")}
    assert est["provider"] == est["providers"][0]["config_key"]  # the one tried first
    bfl = routes["bfl/flux.1-kontext-pro"]
    assert bfl["configured"] is False and bfl["price_per_image"] == 0.04 and bfl["currency"] == "USD"
    assert "BFL_API_KEY" in bfl["unavailable_reason"] and "BFL_API_KEY" in est["message"]
    # Hosted routes make about a megapixel at the ratio they are sent, whatever WxH was asked.
    assert est["size"] == "1024x1024" and est["requested_size"] == "2048x2048"
    # fal's routes take 9 ratios (no 4:5): 4:5 goes to fal as 3:4, so it makes 3:4's size.
    asked = {"model": "flux.1-kontext-pro", "prompt": "x", "aspect_ratio": "4:5"}
    fal = httpx.post(
        base + "/v1/images/generations?dryRun=true", headers={**auth, "x-provider": "fal"}, json=asked, timeout=60
    ).json()
    assert [p["config_key"] for p in fal["providers"]] == ["fal/flux.1-kontext-pro"]
    assert fal["size"] == "887x1182" and fal["requested_size"] == "916x1145"
    # Predictions and edits price the same way; [dev] edits are priced from its cheapest route first.
    image = base64.b64encode(png_bytes(40, 30)).decode()
    pred = httpx.post(
        base + "/v1/predictions?dryRun=true",
        headers=auth,
        json={"model": "black-forest-labs/flux-kontext-max", "input": {"prompt": "x"}},
        timeout=60,
    )
    assert pred.status_code == 200 and pred.json()["total_cost_micros"] == 80_000, pred.text
    edit = httpx.post(
        base + "/v1/images/edits?dryRun=true",
        headers=auth,
        json={
            "model": "flux.1-kontext-dev",
            "prompt": "x",
            "images": [{"image_url": f"data:image/png;base64,{image}"}],
        },
        timeout=60,
    ).json()
    assert edit["providers"][0]["config_key"] == "local/flux.1-kontext-dev" and edit["configured"] is False
    assert edit["size"] == "1184x880"  # the preferred Kontext resolution for a 4:3 input


def test_dry_run_reports_the_size_the_local_engine_produces(server: tuple[str, dict[str, Any]]) -> None:
    base, admin = server
    auth = bearer(admin)
    dry = httpx.post(
        base + "/v1/images/generations?dryRun=true", headers=auth, json={**TINY, "size": "1183x887"}, timeout=60
    ).json()
    assert dry["size"] == "1184x880" and dry["requested_size"] == "1183x887"  # multiples of 16
    assert dry["configured"] is True and "message" not in dry
    assert dry["providers"] == [
        {
            "config_key": "local/kontext-tiny",
            "provider": "local",
            "configured": True,
            "price_per_image": 0.001,
            "currency": "USD",
            "size": "1184x880",
        }
    ]
    # What the dry run says is what a real request reports.
    small = {**TINY, "size": "33x47"}
    dry = httpx.post(base + "/v1/images/generations?dryRun=true", headers=auth, json=small, timeout=60).json()
    real = httpx.post(base + "/v1/images/generations", headers=auth, json=small, timeout=60).json()
    assert dry["size"] == real["size"] == "32x48" and dry["requested_size"] == "33x47"
    exact = httpx.post(base + "/v1/images/generations?dryRun=true", headers=auth, json=TINY, timeout=60).json()
    assert exact["size"] == "32x32" and "requested_size" not in exact


# -- the ledger after a mixed run against the upstream fakes -------------------------------------------------


def test_ledger_totals_equal_request_costs_after_a_mixed_run(upstreams: Upstreams, tmp_path: Path) -> None:
    settings = upstreams.settings(
        tmp_path, provider_priority={"fal": 0, "bfl": 1, "fireworks": 2, "replicate": 3}, breaker_failures=1000
    )
    upstreams.reset()
    with running_server(settings) as base:
        admin = make_key(base, admin=True)
        keys = [make_key(base, bearer(admin), name=f"team-{i}", budget_usd=10) for i in range(2)]

        def gen(key: dict[str, Any], provider: str | None = None, **body: Any) -> httpx.Response:
            headers = {**bearer(key), **({"x-provider": provider} if provider else {})}
            return httpx.post(
                base + "/v1/images/generations",
                headers=headers,
                timeout=60,
                json={"model": "flux.1-kontext-pro", "prompt": "x", **body},
            )

        upstreams.fal.faults.add("503", at="submit")  # retried on fal: one image billed
        assert gen(keys[0]).json()["metadata"]["cost"] == pytest.approx(0.04)
        upstreams.fal.faults.add("500", at="download")  # made and billed upstream, lost: billed twice
        billed = gen(keys[0]).json()["metadata"]
        assert billed["cost"] == pytest.approx(0.08)
        assert [a.get("billed_images") for a in billed["attempts"]] == [1, None]
        upstreams.bfl.faults.add("500", at="submit")  # n=3 fan-out on BFL with one failed sub-request
        fanned = gen(keys[1], provider="bfl", n=3).json()["metadata"]
        assert fanned["cost"] == pytest.approx(0.12) and len(fanned["attempts"]) == 4  # the failed one is free
        upstreams.fal.faults.always("503", at="submit")  # fal down: failover to BFL
        assert gen(keys[1]).json()["metadata"]["provider"] == "bfl"
        upstreams.reset()
        for fake in upstreams.all.values():
            fake.faults.always("502", at="submit")
        assert gen(keys[0]).status_code == 502  # every provider down: nothing made, nothing charged
        upstreams.reset()
        upstreams.fal.faults.add("moderation", at="any")
        assert gen(keys[1]).status_code == 400
        assert gen(keys[1], size="0x0").status_code == 400  # rejected before any reservation
        tiny = httpx.post(base + "/v1/images/generations", headers=bearer(keys[0]), json={**TINY, "n": 2}, timeout=60)
        assert tiny.json()["metadata"]["cost"] == pytest.approx(0.002)
        views = [show(base, k, admin) for k in keys]

    with sqlite3.connect(tmp_path / "kontext.db") as db:
        per_key_requests = dict(
            db.execute(
                "SELECT key_id, SUM(ROUND(COALESCE(cost, 0) * 1000000)) FROM requests GROUP BY key_id"
            ).fetchall()
        )
        per_key_ledger = dict(db.execute("SELECT key_id, SUM(actual_micros) FROM ledger GROUP BY key_id").fetchall())
        open_entries = db.execute("SELECT COUNT(*) FROM ledger WHERE state != 'settled'").fetchone()[0]
        line_totals = db.execute("SELECT lines, actual_micros FROM ledger").fetchall()
    assert open_entries == 0
    for view in views:
        assert per_key_ledger[view["id"]] == per_key_requests[view["id"]] == round(view["total_spent_usd"] * 1e6)
    assert all(sum(line["total_cost"] for line in json.loads(lines)) == actual for lines, actual in line_totals)
    # 0.04 + 0.08 + 0.002 for team-0; for team-1 BFL's three images, the failed-over one, and the image
    # fal moderated: fal documents that it may bill a 422 (the catalog's billed_failures).
    assert per_key_ledger[keys[0]["id"]] == 40_000 + 80_000 + 2_000
    assert per_key_ledger[keys[1]["id"]] == 120_000 + 40_000 + 40_000


def test_two_gateway_processes_share_rate_limits_through_redis(tmp_path: Path) -> None:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis is not reachable on 127.0.0.1:6379 ({exc})")
    settings = Settings(data_dir=tmp_path, rate_limit_url="redis://127.0.0.1:6379/0")
    with running_server(settings) as a, running_server(settings) as b:  # one database, one Redis
        admin = make_key(a, admin=True)
        key = make_key(a, bearer(admin), rpm=3)
        statuses = [
            httpx.post(url + "/v1/images/generations", headers=bearer(key), json=TINY, timeout=60).status_code
            for url in (a, b, a, b)
        ]
    assert statuses == [200, 200, 200, 429]  # three per minute across both, not three each
