"""Routing across real fakes of all four upstreams, driven by the official OpenAI SDK.

Failover to a healthy provider, moderation not failed over, forced providers, everything down,
n=4 fan-out with a failing sub-request, the circuit breaker, and 200 requests under random faults.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import open_image, running_server, sdk_for
from fakes.common import serve
from fakes.upstreams import Upstreams
from kontext_gateway.api.app import create_app

# Order fal, bfl, fireworks, replicate: every test knows who is tried first.
PRIORITY = {"fal": 0, "bfl": 1, "fireworks": 2, "replicate": 3}


@pytest.fixture(scope="module")
def gateway(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = upstreams.settings(
        tmp_path_factory.mktemp("failover"), provider_priority=PRIORITY, breaker_failures=1000
    )  # breakers stay closed here; see the breaker test
    with running_server(settings) as url:
        yield url


@pytest.fixture
def sdk(gateway: str, upstreams: Upstreams) -> Iterator[OpenAI]:
    upstreams.reset()
    with sdk_for(gateway) as client:
        yield client


def meta(resp: Any) -> dict:
    return resp.model_extra["metadata"]


def png_of(resp: Any, i: int = 0) -> Any:
    return open_image(httpx.get(resp.data[i].url).content)


def test_fails_over_from_a_failing_provider_to_a_healthy_one(sdk: OpenAI, upstreams: Upstreams) -> None:
    upstreams.fal.faults.always("503", at="submit")
    resp = sdk.images.generate(model="flux.1-kontext-pro", prompt="a lighthouse")
    m = meta(resp)
    assert m["provider"] == "bfl" and m["cost"] == pytest.approx(0.04)
    assert [(a["config_key"], a["outcome"]) for a in m["attempts"]] == [("fal/flux.1-kontext-pro", "failed")] * 3 + [
        ("bfl/flux.1-kontext-pro", "succeeded")
    ]
    assert {a.get("error_class") for a in m["attempts"][:3]} == {"server_error"}
    assert png_of(resp).format == "PNG"


def test_bad_credentials_fail_over_at_once(sdk: OpenAI, upstreams: Upstreams) -> None:
    upstreams.fal.faults.always("401", at="submit")
    m = meta(sdk.images.generate(model="flux.1-kontext-pro", prompt="x"))
    assert m["provider"] == "bfl" and upstreams.submits("fal") == 1  # not retried
    assert m["attempts"][0]["error_class"] == "authentication" and "fal_test" not in str(m)


def test_moderation_is_not_failed_over(sdk: OpenAI, upstreams: Upstreams) -> None:
    upstreams.fal.faults.add("moderation", at="any")
    with pytest.raises(openai.BadRequestError) as err:
        sdk.images.generate(model="flux.1-kontext-pro", prompt="something flagged")
    assert err.value.body["code"] == "content_policy_violation"
    assert upstreams.submits("fal") == 1
    assert sum(upstreams.submits(n) for n in ("bfl", "fireworks", "replicate")) == 0


@pytest.mark.parametrize("how", ["model", "header"])
def test_forced_provider(sdk: OpenAI, upstreams: Upstreams, how: str) -> None:
    if how == "model":
        resp = sdk.images.generate(model="fireworks/flux.1-kontext-pro", prompt="x")
    else:
        resp = sdk.images.generate(model="flux.1-kontext-pro", prompt="x", extra_headers={"x-provider": "fireworks"})
    assert meta(resp)["provider"] == "fireworks" and upstreams.submits("fal") == 0
    upstreams.reset()
    upstreams.fireworks.faults.always("500", at="submit")
    with pytest.raises(openai.InternalServerError) as err:  # forced: no failover to the others
        sdk.images.generate(model="fireworks/flux.1-kontext-pro", prompt="x")
    assert err.value.status_code == 502 and upstreams.submits("fal") == upstreams.submits("bfl") == 0


def test_all_providers_down_is_502_with_each_attempt(sdk: OpenAI, upstreams: Upstreams, gateway: str) -> None:
    for name, fake in upstreams.all.items():
        fake.faults.always("429" if name == "bfl" else "502", at="submit", retry_after=2)
    resp = httpx.post(
        gateway + "/v1/images/generations", json={"model": "flux.1-kontext-pro", "prompt": "x"}, timeout=60
    )
    assert resp.status_code == 502
    err = resp.json()["error"]
    assert err["code"] == "all_providers_exhausted" and err["type"] == "server_error"
    for key in (
        "fal/flux.1-kontext-pro",
        "bfl/flux.1-kontext-pro",
        "fireworks/flux.1-kontext-pro",
        "replicate/flux.1-kontext-pro",
    ):
        assert key in err["message"]
    assert "rate_limited 429" in err["message"] and "server_error 502" in err["message"]
    assert resp.headers["x-should-retry"] == "true" and resp.headers["retry-after"] == "2"
    assert resp.headers["x-request-id"].startswith("req_")


def test_n4_fan_out_with_one_failing_sub_request(sdk: OpenAI, upstreams: Upstreams) -> None:
    upstreams.bfl.faults.add("500", at="submit")  # the first of four tasks fails once, then succeeds
    resp = sdk.images.generate(
        model="flux.1-kontext-pro",
        prompt="four",
        n=4,
        size="1024x1024",
        extra_headers={"x-provider": "bfl"},
        extra_body={"seed": 100},
    )
    m = meta(resp)
    assert len(resp.data) == 4 and m["cost"] == pytest.approx(4 * 0.04)  # billed four, not five
    assert [a["outcome"] for a in m["attempts"]].count("succeeded") == 4
    assert [a["outcome"] for a in m["attempts"]].count("failed") == 1
    assert upstreams.submits("bfl") == 5
    seeds = sorted(
        body["seed"]
        for method, path, _, body in upstreams.bfl.requests
        if method == "POST" and path.startswith("/v1/flux-kontext")
    )
    assert set(seeds) == {100, 101, 102, 103}  # each image its own seed, the failed one retried
    assert len({httpx.get(d.url).content for d in resp.data}) == 4


def test_circuit_breaker_opens_and_recovers(upstreams: Upstreams, tmp_path: Path) -> None:
    upstreams.reset()
    settings = upstreams.settings(
        tmp_path, provider_priority=PRIORITY, breaker_failures=2, breaker_reset_s=30, upstream_retries=0
    )
    app = create_app(settings)
    with serve(app) as url, sdk_for(url) as sdk:
        # The breaker's clock, moved by hand: the breaker stays open however long the requests take.
        now = [1000.0]
        app.state.gateway.router.health.breaker.clock = lambda: now[0]
        upstreams.fal.faults.always("503", at="submit")
        for _ in range(2):  # two failures open fal's breaker; bfl serves
            assert meta(sdk.images.generate(model="flux.1-kontext-pro", prompt="x"))["provider"] == "bfl"
        m = meta(sdk.images.generate(model="flux.1-kontext-pro", prompt="x"))
        assert m["attempts"][0] == {
            **m["attempts"][0],
            "config_key": "fal/flux.1-kontext-pro",
            "outcome": "skipped",
            "error_class": "circuit_open",
        }
        assert upstreams.submits("fal") == 2  # out of rotation: not called
        upstreams.fal.faults.clear()  # fal recovers; after the reset time one probe goes through
        now[0] += 30
        assert meta(sdk.images.generate(model="flux.1-kontext-pro", prompt="x"))["provider"] == "fal"
        assert meta(sdk.images.generate(model="flux.1-kontext-pro", prompt="x"))["provider"] == "fal"


def test_edit_with_several_images_goes_where_it_fits(sdk: OpenAI, upstreams: Upstreams) -> None:
    from conftest import png_bytes

    images = [(f"{i}.png", png_bytes(64, 48), "image/png") for i in range(3)]
    upstreams.fal.faults.always("503", at="submit")
    resp = sdk.images.edit(model="flux.1-kontext-pro", image=images, prompt="combine them")
    m = meta(resp)
    # Three images: fal (4) failed, BFL (4) serves; Fireworks (1) and Replicate (2) cannot take three.
    assert m["provider"] == "bfl" and upstreams.submits("fireworks") == upstreams.submits("replicate") == 0


def test_200_requests_under_random_faults_all_succeed(upstreams: Upstreams, tmp_path: Path) -> None:
    """The healthy provider (Replicate, tried last) serves every request the others drop."""
    upstreams.reset()
    kinds = ["500", "502", "503", "429", "drop", "malformed", "401"]
    upstreams.fal.faults.randomly(0.5, kinds, seed=1)
    upstreams.bfl.faults.randomly(0.5, kinds, seed=2)
    upstreams.fireworks.faults.randomly(0.5, kinds, seed=3)
    settings = upstreams.settings(tmp_path, provider_priority=PRIORITY)
    with running_server(settings) as url, sdk_for(url) as sdk:

        def one(i: int) -> tuple[str, int]:
            resp = sdk.images.generate(
                model="flux.1-kontext-pro", prompt=f"request {i}", response_format="b64_json", output_format="jpeg"
            )
            return meta(resp)["provider"], len(resp.data)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(200)))
    assert len(results) == 200 and all(n == 1 for _, n in results)
    served = {p for p, _ in results}
    assert "replicate" in served and len(served) > 1  # failover happened, and healthy tries served too
    fired = sum(len(f.faults.fired) for f in (upstreams.fal, upstreams.bfl, upstreams.fireworks))
    assert fired >= 100  # the faults really were injected
    upstreams.reset()
