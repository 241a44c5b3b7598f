"""GET /metrics: Prometheus text, parsed with prometheus_client's own parser, after a scripted run on a
real server (the official OpenAI SDK, kontext-tiny); and the same view merged across an API process
and a worker process in multiprocess mode (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from conftest import PATIENCE_S, png_bytes, running_server, start_kontext, wait_healthy
from fakes.common import free_port, serve, stop
from kontext_gateway.config import Settings

GEN = "/v1/images/generations"
Samples = dict[tuple[str, frozenset], float]


def scrape(base_url: str) -> Samples:
    resp = httpx.get(f"{base_url}/metrics", timeout=30)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


class Receiver:
    def __init__(self) -> None:
        self.calls = 0
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.calls += 1
        return Response(status_code=204)


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    r = Receiver()
    with serve(r.app) as url:
        yield r, url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("metrics")
    settings = Settings(
        data_dir=data,
        database_url=f"sqlite:///{data / 'gateway.db'}",
        allow_private_urls=True,
        webhook_poll_interval_s=0.05,
    )
    with running_server(settings) as url:
        yield url


def test_scripted_run_shows_in_metrics(server: str, receiver: tuple[Receiver, str]) -> None:
    # The registry is per process and other tests' servers share it: compare before with after.
    before = scrape(server)
    client = OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=120)
    for seed in range(3):
        client.images.generate(
            model="kontext-tiny", prompt="a fox", size="64x64", response_format="b64_json", extra_body={"seed": seed}
        )
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="kontext-tiny", prompt="a fox", n=0)
    client.images.edit(
        model="kontext-tiny",
        image=("in.png", png_bytes(64, 48), "image/png"),
        prompt="night",
        response_format="b64_json",
        extra_body={"size": "64x48"},
    )
    client.close()
    pred = httpx.post(
        f"{server}/v1/models/kontext-gateway/kontext-tiny/predictions",
        timeout=60,
        headers={"Prefer": "wait"},
        json={
            "input": {"prompt": "x", "size": "64x64"},
            "webhook": f"{receiver[1]}/hook",
            "webhook_events_filter": ["completed"],
        },
    )
    assert pred.status_code == 201 and pred.json()["status"] == "succeeded"
    rid = pred.json()["id"]
    assert httpx.get(f"{server}/v1/predictions/{rid}").status_code == 200
    assert httpx.get(f"{server}/nowhere").status_code == 404
    deadline = time.monotonic() + PATIENCE_S
    while True:  # the delivery's outcome is recorded just after the receiver answers
        after = scrape(server)
        if delta(before, after, "kontext_webhook_deliveries_total", event="completed", outcome="delivered"):
            break
        assert time.monotonic() < deadline, f"the webhook was not recorded ({receiver[0].calls} calls)"
        time.sleep(0.05)

    req = "kontext_requests_total"
    assert delta(before, after, req, route=GEN, model="kontext-tiny", status="200") == 3
    assert delta(before, after, req, route=GEN, model="kontext-tiny", status="400") == 1
    assert delta(before, after, req, route="/v1/images/edits", model="kontext-tiny", status="200") == 1
    assert (
        delta(before, after, req, route="/v1/models/{owner}/{name}/predictions", model="kontext-tiny", status="201")
        == 1
    )
    assert delta(before, after, req, route="/v1/predictions/{rid}", model="", status="200") == 1
    assert delta(before, after, req, route="other", model="", status="404") == 1
    assert delta(before, after, "kontext_request_duration_seconds_count", route=GEN, model="kontext-tiny") == 4
    assert (
        delta(before, after, "kontext_request_duration_seconds_bucket", route=GEN, model="kontext-tiny", le="+Inf") == 4
    )
    # Five local runs (3 generations, 1 edit, 1 prediction); at least, as a job another test left
    # running in this process (the registry is shared) may finish meanwhile.
    assert (
        delta(
            before,
            after,
            "kontext_provider_request_duration_seconds_count",
            provider="local",
            model="kontext-tiny",
            outcome="succeeded",
        )
        >= 5
    )
    assert delta(before, after, "kontext_queue_wait_seconds_count") >= 5
    assert value(after, "kontext_circuit_state", provider="local/kontext-tiny") == 0
    assert ("kontext_queue_depth", frozenset()) in after
    assert delta(before, after, "kontext_webhook_deliveries_total", event="completed", outcome="delivered") == 1
    # Labels name templates and catalog ids, never a request's own values.
    assert not any(rid in v for _, labels in after for _, v in labels)


def test_every_v1_response_has_a_request_id(server: str) -> None:
    for resp in (
        httpx.get(f"{server}/v1/models"),
        httpx.get(f"{server}/v1/predictions/req_missing"),
        httpx.post(f"{server}{GEN}", content=b"not json"),
    ):
        assert resp.headers["x-request-id"].startswith("req_")


def test_unknown_models_share_one_label(server: str) -> None:
    before = scrape(server)
    for name in ("no-such-model-1", "no-such-model-2"):
        assert httpx.post(f"{server}{GEN}", json={"model": name, "prompt": "x"}).status_code == 404
    after = scrape(server)
    assert delta(before, after, "kontext_requests_total", route=GEN, model="unknown", status="404") == 2


# -- multiprocess: an API process and a worker process, one view -------------------------------------------


def test_multiprocess_api_and_worker_export_one_view(tmp_path: Path) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(prom), "KONTEXT_JOB_POLL_INTERVAL_S": "0.05", "KONTEXT_LOG_FORMAT": "json"}
    data = str(tmp_path / "data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = start_kontext(["serve", "--port", str(port), "--data-dir", data, "--workers", "0"], env, tmp_path / "api.log")
    worker = None
    try:
        wait_healthy(url, api, tmp_path / "api.log")
        # The API process has created the database; the worker shares it (and the metrics directory).
        worker = start_kontext(["worker", "--concurrency", "2", "--data-dir", data], env, tmp_path / "worker.log")
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        for _ in range(2):
            client.images.generate(model="kontext-tiny", prompt="x", size="64x64", response_format="b64_json")
        with pytest.raises(openai.BadRequestError):
            client.images.generate(model="kontext-tiny", prompt="x", n=0)
        client.close()
        after = scrape(url)
        pids = {"api": str(api.pid), "worker": str(worker.pid)}
    finally:
        for proc in (worker, api):
            stop(proc)
    # Each process, once serving, set its start-up heap aside from the collector (well over 50,000
    # objects: the modules, routes and schemas); an in-process test server (above) sets none.
    for name, pid in pids.items():
        assert value(after, "kontext_gc_frozen_objects", pid=pid) > 50_000, name
    assert value(after, "kontext_requests_total", route=GEN, model="kontext-tiny", status="200") == 2
    assert value(after, "kontext_requests_total", route=GEN, model="kontext-tiny", status="400") == 1
    # Run by the worker process, counted in the API process's /metrics.
    assert (
        value(
            after,
            "kontext_provider_request_duration_seconds_count",
            provider="local",
            model="kontext-tiny",
            outcome="succeeded",
        )
        == 2
    )
    assert value(after, "kontext_queue_wait_seconds_count") == 2
    assert value(after, "kontext_circuit_state", provider="local/kontext-tiny") == 0
    assert value(after, "kontext_queue_depth") == 0
    assert any(p.name.startswith("histogram_") for p in prom.iterdir())
