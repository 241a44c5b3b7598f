"""Liveness and readiness: `/health` while the process answers, `/health/ready` only while it can do
its work (database reachable at this code's schema, blob store writable, workers taking jobs)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx

from conftest import running_server
from kontext_gateway.config import Settings
from kontext_gateway.gateway import Gateway


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'k.db'}", **overrides)  # type: ignore[arg-type]


def test_ready_names_each_check_and_turns_503_when_the_schema_is_not_this_codes(tmp_path: Path) -> None:
    with running_server(settings_for(tmp_path)) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        ready = httpx.get(f"{url}/health/ready")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "checks": {"database": "ok", "blob_store": "ok", "workers": "ok"}}

        # Another process migrated the database past this code (a deploy half done).
        with sqlite3.connect(tmp_path / "k.db") as conn:
            (head,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            conn.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
        try:
            not_ready = httpx.get(f"{url}/health/ready")
            assert httpx.get(f"{url}/health").status_code == 200  # alive all the same: no restart
        finally:
            with sqlite3.connect(tmp_path / "k.db") as conn:
                conn.execute("UPDATE alembic_version SET version_num = ?", (head,))
    assert not_ready.status_code == 503
    body = not_ready.json()
    assert body["status"] == "not_ready" and body["checks"]["blob_store"] == "ok"
    assert body["checks"]["database"] == f"database schema at ffffffffffff, this code needs {head}"
    assert body["error"]["code"] == "not_ready" and body["error"]["type"] == "server_error"
    assert "database schema at ffffffffffff" in body["error"]["message"]


async def test_a_draining_process_is_not_ready_and_an_api_only_one_is(tmp_path: Path) -> None:
    gateway = Gateway(settings_for(tmp_path / "jobs"))
    api_only = Gateway(settings_for(tmp_path / "api", workers=0))
    await gateway.start()
    await api_only.start()
    try:
        assert (await gateway.readiness(timeout_s=30))["workers"] == "ok"
        assert (await api_only.readiness(timeout_s=30))["workers"] == "ok"  # its jobs run elsewhere
        gateway.begin_drain()
        assert (await gateway.readiness(timeout_s=30))["workers"] == "draining: taking no more jobs"
    finally:
        await gateway.close()
        await api_only.close()


async def test_an_unwritable_blob_store_is_not_ready(tmp_path: Path) -> None:
    gateway = Gateway(settings_for(tmp_path))
    await gateway.start()
    blobs = tmp_path / "blobs"  # a file where the store's folder should be: no write can succeed
    if blobs.is_dir():
        blobs.rmdir()
    blobs.write_bytes(b"")
    try:
        checks = await gateway.readiness(timeout_s=30)
    finally:
        await gateway.close()
    assert checks["database"] == "ok" and checks["blob_store"] != "ok"
