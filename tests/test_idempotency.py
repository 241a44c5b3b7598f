"""Idempotency-Key: a retried request joins the original job: same response, no second upstream call."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import png_bytes, running_server, sdk_for
from fakes.common import serve
from fakes.replicate import FakeReplicate
from kontext_gateway.config import Settings


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeReplicate, str]]:
    rep = FakeReplicate(pending_polls=3)
    with serve(rep.app) as url:
        yield rep, url


@pytest.fixture(scope="module")
def gateway(fake: tuple[FakeReplicate, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("idem"),
        replicate_api_token="r8_test",
        replicate_base_url=fake[1],
        upstream_poll_interval_s=0.02,
    )
    with running_server(settings) as url:
        yield url


@pytest.fixture
def sdk(gateway: str, fake: tuple[FakeReplicate, str]) -> Iterator[OpenAI]:
    fake[0].requests.clear()
    with sdk_for(gateway) as client:
        yield client


def test_a_retry_joins_the_original(sdk: OpenAI, fake: tuple[FakeReplicate, str]) -> None:
    def call():
        return sdk.images.with_raw_response.generate(
            model="flux.1-kontext-pro",
            prompt="once",
            response_format="b64_json",
            extra_headers={"Idempotency-Key": "gen-1"},
        )

    first, second = call(), call()
    assert first.headers["x-request-id"] == second.headers["x-request-id"]
    assert second.headers["idempotent-replayed"] == "true"
    assert first.parse().data[0].b64_json == second.parse().data[0].b64_json
    assert len(fake[0].submits()) == 1  # one upstream prediction, one charge


def test_concurrent_retries_make_one_job(sdk: OpenAI, fake: tuple[FakeReplicate, str]) -> None:
    def call():
        return sdk.images.with_raw_response.generate(
            model="flux.1-kontext-pro", prompt="together", extra_headers={"Idempotency-Key": "gen-2"}
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: call(), range(4)))
    assert len({r.headers["x-request-id"] for r in responses}) == 1
    assert len(fake[0].submits()) == 1


def test_same_key_other_request_is_422(sdk: OpenAI) -> None:
    sdk.images.generate(model="kontext-tiny", prompt="a", size="32x32", extra_headers={"Idempotency-Key": "k-3"})
    with pytest.raises(openai.UnprocessableEntityError) as err:
        sdk.images.generate(model="kontext-tiny", prompt="b", size="32x32", extra_headers={"Idempotency-Key": "k-3"})
    assert err.value.body["code"] == "idempotency_key_reused"


def test_multipart_retry_with_a_new_boundary(sdk: OpenAI) -> None:
    image = png_bytes(64, 64)

    def call():
        return sdk.images.with_raw_response.edit(
            model="kontext-tiny",
            image=("a.png", image, "image/png"),
            prompt="edit once",
            extra_body={"size": "64x64"},
            extra_headers={"Idempotency-Key": "edit-1"},
        )

    first, second = call(), call()  # each multipart body has its own random boundary
    assert first.headers["x-request-id"] == second.headers["x-request-id"]


def test_a_rejected_request_replays_its_error(sdk: OpenAI) -> None:
    for _ in range(2):
        with pytest.raises(openai.BadRequestError) as err:
            sdk.images.generate(
                model="kontext-tiny", prompt="x", size="0x0", extra_headers={"Idempotency-Key": "bad-1"}
            )
        assert err.value.body["code"] == "invalid_size"


def test_predictions(gateway: str, fake: tuple[FakeReplicate, str]) -> None:
    body = {"input": {"prompt": "once", "aspect_ratio": "1:1"}}
    url = gateway + "/v1/models/black-forest-labs/flux-kontext-pro/predictions"
    first = httpx.post(url, json=body, headers={"Idempotency-Key": "pred-1"})
    second = httpx.post(url, json=body, headers={"Idempotency-Key": "pred-1", "Prefer": "wait=30"}, timeout=60)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"] and second.json()["status"] == "succeeded"
    assert len(fake[0].submits()) == 1
    other = httpx.post(url, json={"input": {"prompt": "twice"}}, headers={"Idempotency-Key": "pred-1"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
