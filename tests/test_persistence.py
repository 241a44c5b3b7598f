"""Every request is recorded, through the real server, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from conftest import running_server
from kontext_gateway.config import Settings
from kontext_gateway.store.db import Database
from kontext_gateway.store.records import RequestRow


def records(url: str, request_id: str) -> RequestRow:
    async def read() -> RequestRow:
        db = Database(Settings(database_url=url).resolved_database_url())
        await db.start()
        try:
            record = await db.get_request(request_id)
            assert record is not None
            return record
        finally:
            await db.close()

    return asyncio.run(read())


def test_requests_are_recorded(database_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=database_url)
    with running_server(settings) as base:
        ok = httpx.post(
            base + "/v1/images/generations",
            timeout=60,
            json={
                "model": "kontext-tiny",
                "prompt": "a lamp",
                "size": "64x48",
                "n": 2,
                "seed": 4,
                "output_format": "webp",
                "my_extra": "kept",
            },
        )
        assert ok.status_code == 200, ok.text
        bad = httpx.post(base + "/v1/images/generations", json={"model": "kontext-tiny", "prompt": "x", "size": "0x0"})
        assert bad.status_code == 400
    rec = records(database_url, ok.headers["x-request-id"])
    assert rec.status == "succeeded" and rec.model == "kontext-tiny" and rec.provider == "local/kontext-tiny"
    assert rec.endpoint == "images.generations" and rec.mode == "text-to-image"
    assert rec.params["size"] == "64x48" and rec.params["seed"] == 4 and rec.params["n"] == 2
    assert rec.params["extra"] == {"my_extra": "kept"}
    assert rec.output_size == "64x48" and rec.output_format == "webp"
    assert len(rec.output_blob_ids) == 2 and all(b.endswith(".webp") for b in rec.output_blob_ids)
    assert all((tmp_path / "blobs" / b[:2] / b[2:4] / b).is_file() for b in rec.output_blob_ids)
    assert rec.cost == 0.002 and rec.duration_ms >= 0 and rec.completed_at >= rec.created_at
    assert rec.attempts[0]["outcome"] == "succeeded"

    failed = records(database_url, bad.headers["x-request-id"])
    assert failed.status == "failed" and failed.error["code"] == "invalid_size"
    assert failed.params["size"] == "0x0"


def test_rejected_requests_are_stored_failed_and_never_claimed(database_url: str, tmp_path: Path) -> None:
    # Workers poll every 10 ms: a rejected request stored as "starting" even for an instant would be claimed.
    settings = Settings(data_dir=tmp_path, database_url=database_url, job_poll_interval_s=0.01)
    with running_server(settings) as base:
        ids = [
            httpx.post(base + "/v1/images/generations", json={"model": "kontext-tiny", "prompt": "x", "n": 0}).headers[
                "x-request-id"
            ]
            for _ in range(30)
        ]
    for rid in ids:
        rec = records(database_url, rid)
        assert rec.status == "failed" and rec.runs == 0 and rec.claimed_by is None
        assert rec.error["param"] == "n" and rec.completed_at is not None
