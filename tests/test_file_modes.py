"""File modes in the data directory: it holds prompts, webhook URLs, key hashes and the secrets, so
the directory is 0700 and the database (with SQLite's -wal and -shm), secret.key and webhook_secret
are 0600, whatever the umask; a directory or database an older version left open is tightened at
start, nothing in it lost. Images are never writable by others."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import png_bytes, running_server
from kontext_gateway.config import Settings
from kontext_gateway.gateway import Gateway
from kontext_gateway.store.blobs import LocalBlobStore

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX permissions")

TINY = {"model": "kontext-tiny", "prompt": "a kite", "size": "32x32"}
PRIVATE_FILES = ("kontext.db", "kontext.db-wal", "kontext.db-shm", "secret.key", "webhook_secret")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """The usual umask (files 0644, folders 0755 unless made private), whatever the test runner's."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_fresh_data_dir_is_private(tmp_path: Path, umask: None) -> None:
    data = tmp_path / "data"
    with running_server(Settings(data_dir=data)) as base:
        resp = httpx.post(base + "/v1/images/generations", json=TINY, timeout=60)
        assert resp.status_code == 200, resp.text
        # While the server runs: SQLite's -wal and -shm exist only while the database is open.
        modes = {name: mode(data / name) for name in PRIVATE_FILES}
        assert mode(data) == 0o700
        assert modes == dict.fromkeys(PRIVATE_FILES, 0o600)
        blob_dirs = [p for p in (data / "blobs").rglob("*") if p.is_dir()]
        assert blob_dirs and not [p for p in [data / "blobs", *blob_dirs] if mode(p) & 0o022]


def test_the_cli_makes_a_private_data_dir_too(tmp_path: Path, umask: None) -> None:
    # `kontext keys create` opens only the database: often what makes the data dir.
    data = tmp_path / "data"
    made = subprocess.run(
        [sys.executable, "-m", "kontext_gateway", "keys", "create", "--name", "a", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KONTEXT_DATA_DIR": str(data)},
    )
    assert made.returncode == 0, made.stderr
    assert mode(data) == 0o700 and mode(data / "kontext.db") == 0o600
    with sqlite3.connect(data / "kontext.db") as con:
        assert con.execute("SELECT name FROM api_keys").fetchall() == [("a",)]


async def test_an_open_data_dir_is_tightened_at_start_and_nothing_is_lost(
    tmp_path: Path, umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    # No workers: nothing runs the request, so it stays as written (and nothing is mid-job at close).
    gw = Gateway(Settings(data_dir=data))
    await gw.start(workers=False)
    assert gw.webhooks.secret  # webhook_secret, as a process running workers makes it
    rid = "req_" + uuid.uuid4().hex
    await gw.db.create_request(
        id=rid, endpoint="predictions", model="kontext-tiny", mode="text-to-image", params={"prompt": "kept"}
    )
    blob = await gw.blobs.put(png_bytes(8, 8), ext="png")
    await gw.close()
    # As an older version (or a careless copy) left them.
    os.chmod(data, 0o755)
    for name in ("kontext.db", "secret.key", "webhook_secret"):
        os.chmod(data / name, 0o644)
    before = {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}

    caplog.set_level(logging.WARNING)
    gw = Gateway(Settings(data_dir=data))
    await gw.start(workers=False)
    try:
        record = await gw.db.get_request(rid)
        assert record is not None and record.params == {"prompt": "kept"}
        assert mode(data) == 0o700
        assert {name: mode(data / name) for name in PRIVATE_FILES} == dict.fromkeys(PRIVATE_FILES, 0o600)
        assert await gw.blobs.get(blob) == before[Path("blobs", blob[:2], blob[2:4], blob)]
    finally:
        await gw.close()
    # Nothing moved or lost: every file is where it was, the same bytes (the database: its rows, above).
    after = {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert set(before) <= set(after)
    assert all(after[p] == before[p] for p in before if not p.name.startswith("kontext.db"))
    said = "\n".join(r.getMessage() for r in caplog.records)
    for path in (data, data / "kontext.db", data / "secret.key", data / "webhook_secret"):
        assert f"{path} was open to other users" in said, said


async def test_a_shared_sticky_data_dir_is_left_alone(
    tmp_path: Path, umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp: chmod 0700 would lock every other user out
    caplog.set_level(logging.WARNING)
    gw = Gateway(Settings(data_dir=shared))
    await gw.start(workers=False)
    await gw.close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert mode(shared / "kontext.db") == 0o600  # its own files are still private
    assert any("sticky" in r.getMessage() for r in caplog.records)


async def test_new_blob_folders_are_never_writable_by_others(tmp_path: Path) -> None:
    old = os.umask(0)  # the worst case: mkdir's default would be 0777
    try:
        store = LocalBlobStore(tmp_path / "blobs")
        blob = await store.put(png_bytes(8, 8), ext="png")
    finally:
        os.umask(old)
    path = store.path(blob)
    assert path is not None and mode(path) == 0o644
    folders = [tmp_path / "blobs", path.parent.parent, path.parent]
    assert [mode(p) for p in folders] == [0o755] * 3
