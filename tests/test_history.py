"""Request history (GET /v1/requests, GET /v1/requests/{id}, DELETE .../payloads) and payload retention,
through the real server with keys, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from conftest import PATIENCE_S, png_bytes, running_server
from kontext_gateway.config import Settings
from kontext_gateway.retention import cutoff as retention_cutoff
from kontext_gateway.store.db import Database
from kontext_gateway.store.models import RequestRecord
from kontext_gateway.store.records import DeliveryRow, RequestRow


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Env:
    """A keyed gateway: an admin key and two team keys, A and B."""

    def __init__(self, base: str, data_dir: Path, database_url: str) -> None:
        self.base, self.data_dir, self.database_url = base, data_dir, database_url
        # The first key is made on the open (loopback, keyless) gateway; from then on keys are needed.
        self.admin = httpx.post(base + "/v1/admin/keys", json={"name": "root", "admin": True}).json()["key"]
        self.a = self.new_key("team-a")
        self.b = self.new_key("team-b")

    def new_key(self, name: str) -> dict[str, Any]:
        resp = httpx.post(self.base + "/v1/admin/keys", json={"name": name}, headers=bearer(self.admin))
        assert resp.status_code == 201, resp.text
        return resp.json()

    def generate(self, key: dict[str, Any], **body: Any) -> httpx.Response:
        body = {"model": "kontext-tiny", "size": "64x64", **body}
        return httpx.post(self.base + "/v1/images/generations", json=body, headers=bearer(key["key"]), timeout=60)

    def get(self, path: str, key: str, **params: Any) -> httpx.Response:
        return httpx.get(self.base + path, params=params, headers=bearer(key), timeout=30)

    def blob_file(self, blob_id: str) -> Path:
        return self.data_dir / "blobs" / blob_id[:2] / blob_id[2:4] / blob_id


@pytest.fixture(scope="module")
def env(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    data_dir = tmp_path_factory.mktemp("history")
    with running_server(Settings(data_dir=data_dir, database_url=database_url)) as base:
        yield Env(base, data_dir, database_url)


def db_execute(url: str, *statements: Any) -> None:
    """Change rows directly (to place requests at chosen times)."""

    async def run() -> None:
        db = Database(Settings(database_url=url).resolved_database_url())
        await db.start()
        try:
            async with db.session() as session, session.begin():
                for stmt in statements:
                    await session.execute(stmt)
        finally:
            await db.close()

    asyncio.run(run())


def walk(env: Env, key: str, **params: Any) -> list[dict[str, Any]]:
    """Every page of a listing, following next_cursor."""
    items, cursor = [], None
    while True:
        page = env.get("/v1/requests", key, **params, **({"cursor": cursor} if cursor else {})).json()
        assert page["object"] == "list"
        items += page["data"]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            return items
        cursor = page["next_cursor"]


def test_filters_scoping_and_pagination(env: Env) -> None:
    a_ids = [env.generate(env.a, prompt=f"a lamp {i}", seed=i).headers["x-request-id"] for i in range(4)]
    bad = env.generate(env.a, prompt="x", size="0x0")
    assert bad.status_code == 400
    b_id = env.generate(env.b, prompt="b's secret").headers["x-request-id"]

    mine = env.get("/v1/requests", env.a["key"], limit=100).json()["data"]
    ids = [r["id"] for r in mine]
    assert set(ids) == {*a_ids, bad.headers["x-request-id"]} and b_id not in ids
    assert ids[0] == bad.headers["x-request-id"]  # newest first
    ok = next(r for r in mine if r["id"] == a_ids[0])
    assert ok["object"] == "request" and ok["status"] == "succeeded" and ok["key_id"] == env.a["id"]
    assert ok["model"] == "kontext-tiny" and ok["provider"] == "local/kontext-tiny" and ok["cost"] == 0.001
    assert ok["prompt"] == "a lamp 0" and ok["n"] == 1 and ok["size"] == "64x64" and ok["output_format"] == "png"
    assert ok["created_at"].endswith("Z") and ok["queue_ms"] >= 0 and ok["duration_ms"] >= 0
    assert ok["attempts"][0]["outcome"] == "succeeded" and ok["purged"] is False and ok["error"] is None
    assert len(ok["output"]) == 1 and httpx.get(ok["output"][0]).status_code == 200

    # The failed request, with the error the client was given (not the internal status / headers).
    failed = env.get("/v1/requests", env.a["key"], status="failed").json()["data"]
    assert [r["id"] for r in failed] == [bad.headers["x-request-id"]]
    assert failed[0]["error"]["code"] == "invalid_size" and set(failed[0]["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert failed[0]["output"] == [] and failed[0]["cost"] is None

    # Filters: model (an alias too), provider name or config key, status lists.
    assert len(env.get("/v1/requests", env.a["key"], model="kontext-tiny", status="succeeded").json()["data"]) == 4
    assert len(env.get("/v1/requests", env.a["key"], provider="local").json()["data"]) == 4
    assert len(env.get("/v1/requests", env.a["key"], provider="local/kontext-tiny").json()["data"]) == 4
    assert env.get("/v1/requests", env.a["key"], provider="fal").json()["data"] == []
    assert env.get("/v1/requests", env.a["key"], model="flux.1-kontext-pro").json()["data"] == []
    assert len(env.get("/v1/requests", env.a["key"], status="succeeded,failed").json()["data"]) == 5
    assert env.get("/v1/requests", env.a["key"], status="done").status_code == 400
    assert env.get("/v1/requests", env.a["key"], limit=0).status_code == 400

    # Time range: ISO 8601 and unix seconds; after is inclusive, before exclusive.
    t = {r["id"]: r["created_at"] for r in mine}
    middle = t[a_ids[2]]
    later = env.get("/v1/requests", env.a["key"], created_after=middle).json()["data"]
    assert {r["id"] for r in later} == {a_ids[2], a_ids[3], bad.headers["x-request-id"]}
    earlier = env.get("/v1/requests", env.a["key"], created_before=middle).json()["data"]
    assert {r["id"] for r in earlier} == {a_ids[0], a_ids[1]}
    unix = datetime.fromisoformat(middle.replace("Z", "+00:00")).timestamp()
    assert {r["id"] for r in env.get("/v1/requests", env.a["key"], created_before=str(unix)).json()["data"]} == {
        a_ids[0],
        a_ids[1],
    }
    assert env.get("/v1/requests", env.a["key"], created_after="last tuesday").status_code == 400

    # Key scoping: A never sees B's requests, by listing, filter or id; the admin key sees every one.
    assert env.get("/v1/requests", env.a["key"], key_id=env.b["id"]).json()["data"] == []
    assert env.get(f"/v1/requests/{b_id}", env.a["key"]).status_code == 404
    assert env.get(f"/v1/requests/{a_ids[0]}", env.b["key"]).status_code == 404
    assert httpx.delete(f"{env.base}/v1/requests/{b_id}/payloads", headers=bearer(env.a["key"])).status_code == 404
    assert httpx.get(env.base + "/v1/requests").status_code == 401
    everyone = walk(env, env.admin, limit=100)
    assert {*a_ids, b_id} <= {r["id"] for r in everyone}
    only_b = env.get("/v1/requests", env.admin, key_id=env.b["id"]).json()["data"]
    assert [r["id"] for r in only_b] == [b_id] and only_b[0]["prompt"] == "b's secret"

    # Three requests at the very same instant: the keyset's id tie-break still walks each exactly once.
    same = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    db_execute(env.database_url, update(RequestRecord).where(RequestRecord.id.in_(a_ids[:3])).values(created_at=same))
    for limit in (1, 2, 3):
        pages = walk(env, env.admin, limit=limit)
        assert len(pages) == len({r["id"] for r in pages}) == len(everyone)
        assert {r["id"] for r in pages} == {r["id"] for r in everyone}
        keys = [(r["created_at"], r["id"]) for r in pages]
        assert keys == sorted(keys, reverse=True)  # newest first, ties by id
    assert env.get("/v1/requests", env.admin, cursor="not-a-cursor").status_code == 400


def test_get_one_with_ledger_and_logs(env: Env) -> None:
    rid = env.generate(env.a, prompt="ledger", n=2).headers["x-request-id"]
    item = env.get(f"/v1/requests/{rid}", env.a["key"]).json()
    assert item["id"] == rid and item["cost"] == 0.002 and item["n"] == 2 and len(item["output"]) == 2
    ledger = item["ledger"]
    assert ledger["state"] == "settled" and ledger["estimate_micros"] == 2000 and ledger["actual_micros"] == 2000
    assert ledger["lines"] == [
        {"provider": "local/kontext-tiny", "metric": "image", "quantity": 2, "unit_price": 0.001, "total_cost": 2000}
    ]
    assert "succeeded: 2 image(s)" in item["logs"]
    assert env.get("/v1/requests/req_nope", env.admin).status_code == 404


def test_purge_removes_payloads_and_keeps_metadata(env: Env) -> None:
    edit = httpx.post(
        env.base + "/v1/images/edits",
        headers=bearer(env.a["key"]),
        timeout=60,
        data={"model": "kontext-tiny", "prompt": "make it night", "size": "64x48"},
        files={"image": ("in.png", png_bytes(80, 60, (10, 200, 90)), "image/png")},
    )
    assert edit.status_code == 200, edit.text
    rid = edit.headers["x-request-id"]
    before = env.get(f"/v1/requests/{rid}", env.a["key"]).json()
    blob_ids = [u.split("/v1/blobs/")[1].split("?")[0] for u in before["output"]]
    record = asyncio.run(_record(env.database_url, rid))
    input_ids = record.params["input_blob_ids"]
    assert len(input_ids) == 1 and all(env.blob_file(b).is_file() for b in [*blob_ids, *input_ids])

    asyncio.run(_delivered_webhook(env.database_url, rid))  # a webhook sent earlier carried the prompt

    resp = httpx.delete(f"{env.base}/v1/requests/{rid}/payloads", headers=bearer(env.a["key"]))
    assert resp.status_code == 200, resp.text
    after = resp.json()
    assert after["purged"] is True and after["prompt"] is None and after["output"] == []
    for field in (
        "status",
        "cost",
        "currency",
        "created_at",
        "completed_at",
        "duration_ms",
        "attempts",
        "ledger",
        "size",
        "n",
        "model",
        "provider",
    ):
        assert after[field] == before[field], field
    assert not any(env.blob_file(b).exists() for b in [*blob_ids, *input_ids])
    assert httpx.get(before["output"][0]).status_code == 404
    record = asyncio.run(_record(env.database_url, rid))
    assert record.input is None and record.params["prompt"] is None and record.output_blob_ids == []
    assert record.purged_at is not None
    assert [d.payload for d in asyncio.run(_deliveries(env.database_url, rid))] == [{"id": rid, "data_removed": True}]
    # The predictions view says so too; a second purge changes nothing.
    assert env.get(f"/v1/predictions/{rid}", env.a["key"]).json()["data_removed"] is True
    again = httpx.delete(f"{env.base}/v1/requests/{rid}/payloads", headers=bearer(env.a["key"])).json()
    assert again == after


def test_purge_keeps_a_blob_another_request_uses(env: Env) -> None:
    same = {"prompt": "the very same picture", "seed": 1234, "size": "48x48"}
    first, second = (env.generate(env.a, **same).headers["x-request-id"] for _ in range(2))
    urls = [env.get(f"/v1/requests/{r}", env.a["key"]).json()["output"][0] for r in (first, second)]
    blob = urls[0].split("/v1/blobs/")[1].split("?")[0]
    assert blob == urls[1].split("/v1/blobs/")[1].split("?")[0]  # identical bytes: one shared file

    httpx.delete(f"{env.base}/v1/requests/{first}/payloads", headers=bearer(env.a["key"])).raise_for_status()
    assert env.blob_file(blob).is_file() and httpx.get(urls[1]).status_code == 200  # still the second's
    httpx.delete(f"{env.base}/v1/requests/{second}/payloads", headers=bearer(env.a["key"])).raise_for_status()
    assert not env.blob_file(blob).exists()


def test_purge_refuses_a_running_request(env: Env) -> None:
    created = httpx.post(
        env.base + "/v1/predictions",
        headers=bearer(env.a["key"]),
        json={
            "model": "kontext-gateway/kontext-tiny",
            "input": {"prompt": "slow", "size": "1024x1024", "num_inference_steps": 100},
        },
    )
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    try:
        resp = httpx.delete(f"{env.base}/v1/requests/{pid}/payloads", headers=bearer(env.a["key"]))
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "request_running"
        assert env.get(f"/v1/requests/{pid}", env.a["key"]).json()["prompt"] == "slow"
    finally:
        httpx.post(f"{env.base}/v1/predictions/{pid}/cancel", headers=bearer(env.a["key"]))
    deadline = time.monotonic() + 60
    while env.get(f"/v1/requests/{pid}", env.a["key"]).json()["status"] in ("starting", "processing"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.delete(f"{env.base}/v1/requests/{pid}/payloads", headers=bearer(env.a["key"])).status_code == 200


async def _delivered_webhook(url: str, rid: str) -> None:
    db = Database(Settings(database_url=url).resolved_database_url())
    await db.start()
    try:
        row = await db.add_delivery(
            rid,
            event="completed",
            url="https://example.com/hook",
            payload={"id": rid, "input": {"prompt": "make it night"}},
        )
        await db.finish_delivery(row or 0, state="delivered", status=200)
    finally:
        await db.close()


async def _deliveries(url: str, rid: str) -> list[DeliveryRow]:
    db = Database(Settings(database_url=url).resolved_database_url())
    await db.start()
    try:
        return await db.list_deliveries(rid)
    finally:
        await db.close()


async def _record(url: str, rid: str) -> RequestRow:
    db = Database(Settings(database_url=url).resolved_database_url())
    await db.start()
    try:
        record = await db.get_request(rid)
        assert record is not None
        return record
    finally:
        await db.close()


def test_metadata_retention_purges_after_the_links_expire(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'k.db'}",
        payload_retention="metadata",
        url_ttl_seconds=1,
        retention_sweep_interval_s=0.2,
    )
    with running_server(settings) as base:
        resp = httpx.post(
            base + "/v1/images/generations",
            timeout=60,
            json={"model": "kontext-tiny", "prompt": "forget me", "size": "32x32"},
        )
        assert resp.status_code == 200, resp.text
        rid = resp.headers["x-request-id"]
        blob = resp.json()["data"][0]["url"].split("/v1/blobs/")[1].split("?")[0]
        item = httpx.get(f"{base}/v1/requests/{rid}").json()
        assert item["prompt"] is None  # metadata-only: prompts are never shown
        deadline = time.monotonic() + PATIENCE_S
        while not (item := httpx.get(f"{base}/v1/requests/{rid}").json())["purged"]:
            assert time.monotonic() < deadline, "the sweep did not purge the request"
            time.sleep(0.2)
    assert item["status"] == "succeeded" and item["cost"] == 0.001 and item["output"] == []
    assert not (tmp_path / "blobs" / blob[:2] / blob[2:4] / blob).exists()
    record = asyncio.run(_record(settings.resolved_database_url(), rid))
    assert record.params["prompt"] is None and record.input is None


def test_retention_cutoff() -> None:
    def cutoff(**settings: Any) -> datetime | None:
        return retention_cutoff(Settings(**{"payload_retention": "full", "url_ttl_seconds": 3600, **settings}), now)

    now = datetime(2026, 11, 21, 12, tzinfo=UTC)
    assert cutoff() is None  # full, forever: nothing is due and no sweep runs
    assert cutoff(payload_retention_days=2) == now - timedelta(days=2)
    assert cutoff(payload_retention="metadata") == now - timedelta(hours=1)
