"""Webhooks for jobs: signed per Standard Webhooks (every delivery verified with the `standardwebhooks`
library), events filtered, the terminal one retried, one delivery in flight per prediction, 410 honoured,
private targets refused. Jobs run in-process through `Gateway`; the receiver is a real server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from conftest import PATIENCE_S, await_until, running_server
from fakes.common import free_port, serve
from kontext_gateway.api import webhooks as webhooks_api
from kontext_gateway.config import Settings
from kontext_gateway.errors import GatewayError
from kontext_gateway.gateway import Gateway
from kontext_gateway.jobs import webhooks as webhooks_jobs
from kontext_gateway.jobs.webhooks import WebhookSecret, validate_webhook_url
from kontext_gateway.protocol import image_call
from kontext_gateway.store.db import Database
from kontext_gateway.store.models import utcnow
from kontext_gateway.store.records import DeliveryRow, JobStatus, RequestRow

FAST: dict[str, Any] = {
    "webhook_retry_delays_s": [0.05, 0.1, 0.2],
    "webhook_retry_jitter": 0.1,
    "webhook_poll_interval_s": 0.05,
    "job_poll_interval_s": 0.05,
    "webhook_timeout_s": 5.0,
    "workers": 4,
}
JOB = {"model": "kontext-tiny", "prompt": "x", "size": "64x64"}
HOLD_S = PATIENCE_S  # the longest a held receiver call waits for its gate


# -- the receiver: records every call, verifies every signature, misbehaves on command ---------------------


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes
    payload: dict[str, Any]
    verified: bool
    at: float


@dataclass
class Receiver:
    url: str = ""
    secret: str | None = None
    calls: list[Call] = field(default_factory=list)
    plan: list[tuple[int, dict[str, str], float]] = field(default_factory=list)  # answers, in order
    delay: float = 0.0  # for calls past the plan
    inflight: dict[str, int] = field(default_factory=dict)
    max_inflight: dict[str, int] = field(default_factory=dict)
    peak: int = 0  # the most calls in flight at once, across predictions
    # When set: every call is held until it opens (or HOLD_S pass), so calls that can overlap do.
    gate: threading.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.calls.clear(), self.plan.clear(), self.inflight.clear(), self.max_inflight.clear()
            self.delay, self.secret, self.peak, self.gate = 0.0, None, 0, None

    def answer(self, *statuses: int, headers: dict[str, str] | None = None, delay: float = 0.0) -> None:
        with self.lock:
            self.plan.extend((s, headers or {}, delay) for s in statuses)

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        try:
            payload, verified = Webhook(self.secret or "whsec_").verify(body, headers), True
        except (WebhookVerificationError, ValueError, TypeError):
            payload, verified = json.loads(body), False
        pid = payload["id"]
        with self.lock:
            self.calls.append(Call(headers, body, payload, verified, time.monotonic()))
            self.inflight[pid] = self.inflight.get(pid, 0) + 1
            self.max_inflight[pid] = max(self.max_inflight.get(pid, 0), self.inflight[pid])
            self.peak = max(self.peak, sum(self.inflight.values()))
            status, extra, delay = self.plan.pop(0) if self.plan else (200, {}, self.delay)
            gate = self.gate
        try:
            if gate is not None:
                await asyncio.to_thread(gate.wait, HOLD_S)
            await asyncio.sleep(delay)
        finally:
            with self.lock:
                self.inflight[pid] -= 1
        return Response(b"ok", status_code=status, headers=extra)

    def for_prediction(self, pid: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.payload["id"] == pid]


@pytest.fixture(scope="module")
def served_receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/hook", receiver.handle, methods=["POST"])])
    with serve(app) as base:
        receiver.url = base + "/hook"
        yield receiver


@pytest.fixture
def receiver(served_receiver: Receiver) -> Receiver:
    served_receiver.reset()
    return served_receiver


@asynccontextmanager
async def gateway(
    tmp_path: Path, receiver: Receiver | None = None, *, workers: bool = True, **overrides: Any
) -> AsyncIterator[Gateway]:
    values = {"data_dir": tmp_path, "allow_private_urls": True, **FAST, **overrides}
    gw = Gateway(Settings(**values))
    await gw.start(workers=workers)
    if receiver is not None:
        receiver.secret = gw.webhooks.secret.key
    try:
        yield gw
    finally:
        await gw.close()


async def run_job(gw: Gateway, url: str, events: list[str] | None = None, **fields: Any) -> RequestRow:
    """The job's final record, once its runner is done: every event it emits is queued by then."""
    rid = await gw.images.submit(
        image_call("text-to-image", {**JOB, **fields}),
        base_url="http://localhost/",
        webhook=url,
        webhook_events=events,
    )
    record = await gw.images.wait(rid)
    # wait() may read the final status before the runner has queued the completed event.
    assert await await_until(lambda: rid not in gw.worker.running), f"the runner of {rid} did not finish"
    return record


async def settle(gw: Gateway, rid: str, count: int, timeout: float = PATIENCE_S) -> list[DeliveryRow]:
    """The request's delivery log once it has `count` rows and none is still open."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await gw.db.list_deliveries(rid)
        if len(rows) >= count and all(r.state not in ("pending", "sending") for r in rows):
            return rows
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.02)


def msg_id(row: DeliveryRow) -> str:
    return f"msg_{row.request_id}_{row.id}"


# -- events, order, signatures --------------------------------------------------------------------------


async def test_start_output_completed_signed_in_order(tmp_path: Path, receiver: Receiver) -> None:
    async with gateway(tmp_path, receiver) as gw:
        record = await run_job(gw, receiver.url)
        assert record.status == "succeeded"
        rows = await settle(gw, record.id, 3)
    assert [r.event for r in rows] == ["start", "output", "completed"]
    assert all(r.state == "delivered" and r.attempts == 1 and r.last_status == 200 for r in rows)
    calls = receiver.for_prediction(record.id)
    assert len(calls) == 3 and all(c.verified for c in calls)
    assert [c.headers["webhook-id"] for c in calls] == [msg_id(r) for r in rows]  # in order, one each
    assert all(c.headers["content-type"] == "application/json" for c in calls)
    assert all(c.headers["webhook-signature"].startswith("v1,") for c in calls)
    start, output, completed = (c.payload for c in calls)
    assert start["status"] == "processing" and start["output"] is None and start["started_at"]
    assert completed["status"] == "succeeded" and completed["completed_at"] and completed["error"] is None
    assert isinstance(completed["output"], str) and "/v1/blobs/" in completed["output"]
    # The same result: each event's link is signed as the event is written, its expiry counted from
    # then, so the two links may differ in their query when the events fall on different seconds.
    assert urlsplit(output["output"]).path == urlsplit(completed["output"]).path
    assert completed["urls"]["get"].endswith(f"/v1/predictions/{record.id}")
    assert rows[-1].payload == completed  # the delivery log keeps what was sent


@pytest.mark.parametrize(
    "events,expected",
    [
        (["completed"], ["completed"]),
        (["start"], ["start"]),
        (["output"], ["output"]),
        (["start", "completed"], ["start", "completed"]),
        (["logs"], []),
    ],
)
async def test_filter_is_honoured(tmp_path: Path, receiver: Receiver, events: list[str], expected: list[str]) -> None:
    async with gateway(tmp_path, receiver) as gw:
        record = await run_job(gw, receiver.url, events)  # every event the filter let through is queued
        rows = await settle(gw, record.id, len(expected))
    assert [r.event for r in rows] == expected
    assert len(receiver.for_prediction(record.id)) == len(expected)


async def test_failed_prediction_completes_once_without_output(tmp_path: Path) -> None:
    async with gateway(tmp_path, workers=False) as gw:
        rid = "req_" + uuid.uuid4().hex
        await gw.db.create_request(
            id=rid,
            endpoint="predictions",
            model="kontext-tiny",
            mode="text-to-image",
            params={},
            webhook="http://127.0.0.1:9/hook",
        )
        await gw.db.mark_failed(rid, error={"message": "no"}, attempts=[], duration_ms=1)
        record = await record_of(gw, rid)
        await gw.webhooks.emit(record, "completed")
        await gw.webhooks.emit(record, "completed")  # e.g. a second cancel: announced once
        rows = await gw.db.list_deliveries(rid)
    assert [(r.event, r.payload["status"], r.payload["output"]) for r in rows] == [("completed", "failed", None)]


# -- retries ----------------------------------------------------------------------------------------------


async def test_terminal_event_retried_until_delivered(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answer(500, 503, 502)
    async with gateway(tmp_path, receiver) as gw:
        record = await run_job(gw, receiver.url, ["completed"])
        rows = await settle(gw, record.id, 1)
    (row,) = rows
    assert row.state == "delivered" and row.attempts == 4 and row.last_status == 200
    assert row.last_error is None and row.delivered_at is not None
    calls = receiver.for_prediction(record.id)
    assert len(calls) == 4 and all(c.verified for c in calls)
    assert {c.headers["webhook-id"] for c in calls} == {msg_id(row)}  # the same message every time
    assert len({c.body for c in calls}) == 1
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.04 and gaps[2] >= 0.17  # the schedule, ±10 % jitter


async def test_terminal_event_fails_after_the_last_attempt(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answer(500, 500, 500, 500, 500)
    async with gateway(tmp_path, receiver) as gw:
        record = await run_job(gw, receiver.url, ["completed"])
        (row,) = await settle(gw, record.id, 1)
    assert row.state == "failed" and row.attempts == 4 and row.last_status == 500
    assert row.last_error == "HTTP 500"
    assert len(receiver.for_prediction(record.id)) == 4  # 1 + len(webhook_retry_delays_s)


async def test_non_terminal_failure_is_dropped_not_retried(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answer(500)  # the start event
    async with gateway(tmp_path, receiver) as gw:
        record = await run_job(gw, receiver.url, ["start", "completed"])
        rows = await settle(gw, record.id, 2)
    assert [(r.event, r.state, r.attempts) for r in rows] == [
        ("start", "dropped", 1),
        ("completed", "delivered", 1),
    ]
    assert rows[0].last_status == 500
    assert len(receiver.for_prediction(record.id)) == 2


async def test_429_retry_after_is_honoured(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answer(429, headers={"retry-after": "1"})
    async with gateway(tmp_path, receiver) as gw:
        record = await run_job(gw, receiver.url, ["completed"])
        (row,) = await settle(gw, record.id, 1)
    assert row.state == "delivered" and row.attempts == 2
    first, second = receiver.for_prediction(record.id)
    assert second.at - first.at >= 0.9  # not the 0.05 s of the schedule


async def test_unreachable_receiver_is_retried_and_logged_without_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook?token=receiver-own-token"  # nothing listens there
    async with gateway(tmp_path) as gw:
        record = await run_job(gw, url, ["completed"])
        (row,) = await settle(gw, record.id, 1)
    assert row.state == "failed" and row.attempts == 4 and row.last_status is None
    assert row.last_error.startswith("ConnectError") and "receiver-own-token" not in row.last_error


# -- one delivery in flight per prediction; 410 -----------------------------------------------------------


async def test_never_two_deliveries_in_flight_per_prediction(tmp_path: Path, receiver: Receiver) -> None:
    # The receiver holds every call until deliveries of all three predictions are in flight at once: the
    # predictions' later events queue meanwhile, and none of them may go out beside its own first one.
    receiver.gate = threading.Event()
    async with gateway(tmp_path, receiver, webhook_concurrency=8) as gw:
        runs = [asyncio.create_task(run_job(gw, receiver.url, seed=i)) for i in range(3)]
        try:
            await await_until(lambda: receiver.peak >= 3)
        finally:
            receiver.gate.set()
        records = await asyncio.gather(*runs)
        for r in records:
            await settle(gw, r.id, 3)
    for r in records:
        calls = receiver.for_prediction(r.id)
        assert len(calls) == 3 and receiver.max_inflight[r.id] == 1
        assert [c.payload["status"] for c in calls] == ["processing", "succeeded", "succeeded"]
    # Different predictions do go out side by side: one delivery of each was held at the same time.
    assert max(receiver.inflight.values()) == 0 and receiver.peak == 3


async def test_410_stops_the_predictions_deliveries(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answer(410)  # to the start event
    async with gateway(tmp_path, receiver) as gw:
        record = await run_job(gw, receiver.url)
        rows = await settle(gw, record.id, 3)
    assert [(r.event, r.state) for r in rows] == [
        ("start", "dropped"),
        ("output", "dropped"),
        ("completed", "dropped"),
    ]
    assert rows[0].last_status == 410 and rows[2].attempts in (0, 1) and rows[2].last_status is None
    assert len(receiver.for_prediction(record.id)) == 1


async def test_deliveries_outlive_the_process(tmp_path: Path, receiver: Receiver) -> None:
    async with gateway(tmp_path, workers=False) as gw:  # no dispatcher: queued, not sent
        rid = "req_" + uuid.uuid4().hex
        await gw.db.create_request(
            id=rid, endpoint="predictions", model="kontext-tiny", mode="text-to-image", params={}, webhook=receiver.url
        )
        await gw.db.mark_failed(rid, error={"message": "boom"}, attempts=[], duration_ms=1)
        await gw.webhooks.emit(await record_of(gw, rid), "completed")
        (row,) = await gw.db.list_deliveries(rid)
        assert row.state == "pending"
    async with gateway(tmp_path, receiver) as gw:  # the next process sends it
        (row,) = await settle(gw, rid, 1)
    assert row.state == "delivered"
    (call,) = receiver.for_prediction(rid)
    assert call.verified and call.payload["status"] == "failed" and call.payload["error"] == "boom"


async def test_non_terminal_events_throttled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The throttle's clock, moved by hand: how long the emits themselves take does not matter.
    now = [1000.0]
    monkeypatch.setattr(webhooks_jobs, "time", SimpleNamespace(monotonic=lambda: now[0]))
    async with gateway(tmp_path, workers=False) as gw:
        rid = "req_" + uuid.uuid4().hex
        await gw.db.create_request(
            id=rid,
            endpoint="predictions",
            model="kontext-tiny",
            mode="text-to-image",
            params={},
            webhook="http://127.0.0.1:9/hook",
        )
        record = await record_of(gw, rid)
        for _ in range(5):
            await gw.webhooks.emit(record, "logs")
        now[0] += 0.55
        await gw.webhooks.emit(record, "logs")
        # Terminal: never throttled; its output event, within 500 ms of the last logs one, is.
        await gw.webhooks.emit(dataclasses.replace(record, status=JobStatus.SUCCEEDED), "completed")
        await gw.webhooks.emit(dataclasses.replace(record, webhook=None), "start")  # no webhook: nothing
        rows = await gw.db.list_deliveries(rid)
    assert [r.event for r in rows] == ["logs", "logs", "completed"]


async def test_webhook_body_is_the_prediction_object(tmp_path: Path) -> None:
    """Deliveries carry the prediction exactly as the predictions API renders it, links on the public URL."""
    async with gateway(tmp_path, workers=False, public_url="https://gw.example") as gw:
        record = await run_job_record(gw)
        body = gw.webhooks.render(record, gw.webhooks.base_url())
        assert body == gw.predictions.render(record, "https://gw.example/")
    assert set(body) >= {
        "id",
        "model",
        "version",
        "input",
        "logs",
        "output",
        "error",
        "status",
        "created_at",
        "started_at",
        "completed_at",
        "urls",
        "metrics",
    }
    assert body["urls"]["get"] == f"https://gw.example/v1/predictions/{record.id}"
    assert body["status"] == "failed" and body["error"] == "no" and body["output"] is None
    assert body["created_at"].endswith("Z") and body["metrics"]["total_time"] >= 0
    json.dumps(body)  # JSON-ready as it is


async def record_of(gw: Gateway, rid: str) -> RequestRow:
    record = await gw.db.get_request(rid)
    assert record is not None
    return record


async def run_job_record(gw: Gateway) -> RequestRow:
    rid = "req_" + uuid.uuid4().hex
    await gw.db.create_request(
        id=rid,
        endpoint="predictions",
        model="kontext-tiny",
        mode="text-to-image",
        params={},
        webhook="http://127.0.0.1:9/hook",
    )
    await gw.db.mark_failed(rid, error={"message": "no"}, attempts=[], duration_ms=1)
    return await record_of(gw, rid)


# -- the secret ---------------------------------------------------------------------------------------------


async def test_secret_endpoint_verifies_the_signatures(tmp_path: Path, receiver: Receiver) -> None:
    async with gateway(tmp_path) as gw:
        app = FastAPI()
        app.include_router(webhooks_api.router)
        app.state.gateway = gw
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            resp = await http.get("/v1/webhooks/default/secret")
        assert resp.status_code == 200 and resp.headers["cache-control"] == "no-store"
        key = resp.json()["key"]
        assert key.startswith("whsec_") and len(Webhook(key)._whsecret) == 32
        receiver.secret = key  # the receiver knows only what the endpoint said
        record = await run_job(gw, receiver.url, ["completed"])
        await settle(gw, record.id, 1)
    (call,) = receiver.for_prediction(record.id)
    assert call.verified
    with pytest.raises(WebhookVerificationError):  # and a different key would not verify it
        Webhook(WebhookSecret.load(Settings(data_dir=tmp_path / "other")).key).verify(call.body, call.headers)
    # Kept private in data_dir, and the same for the next process.
    path = tmp_path / "webhook_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == key
    assert WebhookSecret.load(Settings(data_dir=tmp_path)).key == key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".webhook_secret.")]


async def test_configured_secret(tmp_path: Path, receiver: Receiver) -> None:
    key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    async with gateway(tmp_path, receiver, webhook_secret=key) as gw:
        assert gw.webhooks.secret.key == key and key not in repr(gw.webhooks.secret)
        record = await run_job(gw, receiver.url, ["completed"])
        await settle(gw, record.id, 1)
    assert receiver.for_prediction(record.id)[0].verified
    assert not (tmp_path / "webhook_secret").exists()
    with pytest.raises(ValueError, match="base64"):
        WebhookSecret("whsec_not*base64")
    with pytest.raises(ValueError, match="too short"):
        WebhookSecret("whsec_c2hvcnQ=")


async def test_secret_never_logged(tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.answer(500, 410)
    url = receiver.url + "?token=receiver-own-token"
    async with gateway(tmp_path, receiver) as gw:
        key = gw.webhooks.secret.key
        record = await run_job(gw, url, ["start", "completed"])
        rows = await settle(gw, record.id, 2)
    assert [r.state for r in rows] == ["dropped", "dropped"]
    ours = [r for r in caplog.records if r.name.startswith("kontext_gateway")]
    assert any("webhook" in r.getMessage() for r in ours)  # it did log the deliveries
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert key not in text and key.removeprefix("whsec_") not in text
    assert not any("receiver-own-token" in r.getMessage() for r in ours)
    assert all(key not in (r.last_error or "") for r in rows)


def test_each_key_reads_its_own_secret_and_its_webhooks_are_signed_with_it(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = "kx-admin-" + uuid.uuid4().hex
    with running_server(Settings(data_dir=tmp_path, admin_key=admin, **{**FAST, "allow_private_urls": True})) as base:

        def bearer(key: str) -> dict[str, str]:
            return {"authorization": f"Bearer {key}"}

        a, b = (httpx.post(base + "/v1/admin/keys", headers=bearer(admin), json={"name": n}).json() for n in "ab")

        def secret_of(key: str) -> str:
            resp = httpx.get(base + "/v1/webhooks/default/secret", headers=bearer(key))
            assert resp.status_code == 200 and resp.headers["cache-control"] == "no-store"
            (value,) = resp.json().values()
            return value

        secrets = {"a": secret_of(a["key"]), "b": secret_of(b["key"]), "admin": secret_of(admin)}
        gateway_secret = (tmp_path / "webhook_secret").read_text()
        assert len({*secrets.values(), gateway_secret}) == 4  # each key its own; none is the gateway's
        assert all(len(Webhook(s)._whsecret) == 32 for s in secrets.values())
        assert secret_of(a["key"]) == secrets["a"]
        # A keyed gateway serves nothing to a caller without a key.
        anonymous = httpx.get(base + "/v1/webhooks/default/secret")
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"

        def predict(key: str) -> str:
            resp = httpx.post(
                base + "/v1/predictions",
                headers=bearer(key),
                timeout=60,
                json={
                    "model": "kontext-tiny",
                    "input": {"prompt": "x", "size": "32x32"},
                    "webhook": receiver.url,
                    "webhook_events_filter": ["completed"],
                },
            )
            assert resp.status_code == 201, resp.text
            return resp.json()["id"]

        receiver.secret = secrets["a"]  # it records every call; which secret verifies which is checked below
        ids = {"a": predict(a["key"]), "b": predict(b["key"]), "admin": predict(admin)}
        deadline = time.monotonic() + PATIENCE_S
        while not all(receiver.for_prediction(pid) for pid in ids.values()):
            assert time.monotonic() < deadline, receiver.calls
            time.sleep(0.05)
    for who, pid in ids.items():
        (call,) = receiver.for_prediction(pid)
        assert Webhook(secrets[who]).verify(call.body, call.headers)["id"] == pid
        for other in [s for w, s in secrets.items() if w != who] + [gateway_secret]:
            with pytest.raises(WebhookVerificationError):  # no other key's receiver would accept it
                Webhook(other).verify(call.body, call.headers)
    # Derived, not stored: the next process has the same secrets, and neither the database nor the log
    # holds any of them.
    restarted = WebhookSecret.load(Settings(data_dir=tmp_path))
    assert restarted.derive(a["id"]).key == secrets["a"] and restarted.derive("admin").key == secrets["admin"]
    forms = [
        form
        for s in [*secrets.values(), gateway_secret]
        for form in (s.encode(), s.removeprefix("whsec_").encode(), Webhook(s)._whsecret)
    ]
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("kontext.db*"))
    with sqlite3.connect(tmp_path / "kontext.db") as con:
        stored += "\n".join(con.iterdump()).encode()
    assert b"api_keys" in stored and not [f for f in forms if f in stored]
    logged = (caplog.text + "".join(r.getMessage() for r in caplog.records)).encode()
    assert any("webhook" in r.getMessage() for r in caplog.records if r.name.startswith("kontext_gateway"))
    assert not [f for f in forms if f in logged]


# -- private targets ----------------------------------------------------------------------------------------


async def test_validate_webhook_url(tmp_path: Path) -> None:
    strict = Settings(data_dir=tmp_path)
    assert strict.allow_private_urls is False
    for url in ("http://127.0.0.1:8080/hook", "http://localhost/hook", "http://169.254.169.254/latest"):
        with pytest.raises(GatewayError) as info:
            await validate_webhook_url(url, strict)
        assert (info.value.status, info.value.code, info.value.param) == (422, "url_not_allowed", "webhook")
    with pytest.raises(GatewayError) as info:
        await validate_webhook_url("ftp://example.com/hook", strict)
    assert info.value.status == 422 and info.value.code == "invalid_url"
    await validate_webhook_url("http://127.0.0.1:8080/hook", Settings(data_dir=tmp_path, allow_private_urls=True))
    await validate_webhook_url("https://8.8.8.8/hook", strict)


def test_allow_private_urls_from_environment_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KONTEXT_ALLOW_PRIVATE_URLS", "1")
    assert Settings(data_dir=tmp_path).allow_private_urls is True
    monkeypatch.delenv("KONTEXT_ALLOW_PRIVATE_URLS")
    config = tmp_path / "kontext.toml"
    config.write_text("allow_private_urls = true\nwebhook_retry_delays_s = [1, 2]\n")
    monkeypatch.setenv("KONTEXT_CONFIG", str(config))
    s = Settings(data_dir=tmp_path)
    assert s.allow_private_urls is True and s.webhook_retry_delays_s == [1, 2]


async def test_private_target_dropped_at_send_time(tmp_path: Path, receiver: Receiver) -> None:
    # Accepted earlier (say, when its name resolved elsewhere): the check before each send stops it.
    async with gateway(tmp_path, receiver, allow_private_urls=False) as gw:
        record = await run_job(gw, receiver.url, ["start", "completed"])
        rows = await settle(gw, record.id, 2)
    assert [r.state for r in rows] == ["dropped", "dropped"]
    assert all(r.last_error.startswith("url_not_allowed") and r.last_status is None for r in rows)
    assert receiver.for_prediction(record.id) == []


# -- the claim, on SQLite and the real PostgreSQL ----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'kontext.db'}")
        await database.start()
        yield database
        await database.close()
        return
    try:
        # Refused at once when it is not there; a busy server is only slow to answer.
        admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test", timeout=PATIENCE_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {e!r}")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    database = Database(
        "postgresql+asyncpg://postgres@127.0.0.1:5432/test", connect_args={"server_settings": {"search_path": schema}}
    )
    try:
        await database.start()
        yield database
    finally:
        await database.close()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def _request(db: Database) -> str:
    rid = "req_" + uuid.uuid4().hex
    await db.create_request(
        id=rid, endpoint="predictions", model="m", mode="text-to-image", params={}, webhook="http://127.0.0.1:9/"
    )
    return rid


async def test_claim_one_in_flight_per_request_in_order(db: Database) -> None:
    a, b = await _request(db), await _request(db)
    ids_a = [await db.add_delivery(a, event=e, url="http://x/", payload={"e": e}) for e in ("start", "completed")]
    id_b = await db.add_delivery(b, event="start", url="http://x/", payload={})
    # Concurrent claims: each delivery is taken once, and `a`'s second waits for its first.
    claimed = await asyncio.gather(*(db.claim_delivery(30) for _ in range(6)))
    taken = sorted(c.id for c in claimed if c is not None)
    assert taken == sorted([ids_a[0], id_b])
    first = next(c for c in claimed if c is not None and c.id == ids_a[0])
    assert first.state == "sending" and first.attempts == 1
    assert await db.claim_delivery(30) is None
    await db.retry_delivery(ids_a[0], at=utcnow() + timedelta(seconds=60), status=500, error="HTTP 500")
    assert await db.claim_delivery(30) is None  # still a's oldest open one, not due yet: a waits
    await db.finish_delivery(ids_a[0], state="delivered", status=200)
    nxt = await db.claim_delivery(30)
    assert nxt is not None and nxt.id == ids_a[1]


async def test_expired_sending_lease_is_claimed_again(db: Database) -> None:
    rid = await _request(db)
    did = await db.add_delivery(rid, event="completed", url="http://x/", payload={})
    claimed = await db.claim_delivery(3600)
    assert claimed is not None and claimed.id == did
    assert await db.claim_delivery(30) is None  # its sender holds the lease
    # The sender died and its lease ran out: moved into the past in the row, not waited for.
    await db._update_delivery(did, lease_until=utcnow() - timedelta(seconds=1))
    again = await db.claim_delivery(30)
    assert again is not None and again.id == did and again.attempts == 2
    await db.release_delivery(did)  # a shutdown hands it back, the attempt not counted
    (row,) = await db.list_deliveries(rid)
    assert row.state == "pending" and row.attempts == 1
    await db.drop_deliveries(rid, error="gone")
    assert (await db.list_deliveries(rid))[0].state == "dropped" and await db.claim_delivery(30) is None
