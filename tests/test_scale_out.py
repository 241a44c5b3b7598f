"""Scale-out: three `kontext worker` processes on one PostgreSQL database, 500 queued predictions on an
instant fake provider: each runs exactly once and none is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PATIENCE_S, throwaway_postgres_database
from fakes.common import serve
from fakes.replicate import FakeReplicate
from kontext_gateway.config import Settings
from kontext_gateway.gateway import Gateway
from kontext_gateway.protocol import prediction_call
from kontext_gateway.store.records import ENDED, RequestRow

JOBS = 500


@pytest.fixture
def pg_database() -> Iterator[str]:
    with throwaway_postgres_database("kontext_scale") as url:
        yield url


def test_three_workers_run_each_job_exactly_once(pg_database: str, tmp_path: Path) -> None:
    fake = FakeReplicate(pending_polls=0)  # answers at once (Prefer: wait)...
    gate = threading.Event()  # ...once every worker has claimed a job: the first up cannot run them all

    async def held(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await asyncio.to_thread(gate.wait)
        await fake.app(scope, receive, send)

    with serve(held) as fake_url:
        env = {
            "DATABASE_URL": pg_database,
            "KONTEXT_DATA_DIR": str(tmp_path),
            "REPLICATE_API_TOKEN": "r8_test",
            "REPLICATE_BASE_URL": fake_url,
            "KONTEXT_JOB_POLL_INTERVAL_S": "0.1",
        }
        settings = Settings(
            data_dir=tmp_path, database_url=pg_database, replicate_api_token="r8_test", replicate_base_url=fake_url
        )

        async def enqueue() -> list[str]:
            gw = Gateway(settings)
            await gw.start(workers=False)  # this process only queues
            try:
                return [
                    await gw.images.submit(
                        prediction_call("replicate/flux.1-kontext-pro", {"input": {"prompt": f"job {i}"}}).call,
                        base_url="http://localhost/",
                    )
                    for i in range(JOBS)
                ]
            finally:
                await gw.close()

        ids = asyncio.run(enqueue())
        log = open(tmp_path / "workers.log", "wb")  # a file, not a pipe nobody reads (it could fill)
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "kontext_gateway", "worker", "--concurrency", "8"],
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            for _ in range(3)
        ]
        try:

            async def finished() -> list[RequestRow]:
                gw = Gateway(settings)
                await gw.start(workers=False)
                try:
                    deadline = time.monotonic() + PATIENCE_S
                    while len({r.claimed_by for r in await gw.db.list_requests(limit=JOBS)} - {None}) < 3:
                        assert time.monotonic() < deadline, "not every worker claimed a job"
                        assert all(w.poll() is None for w in workers), "a worker died"
                        await asyncio.sleep(0.1)
                    gate.set()
                    deadline = time.monotonic() + 240
                    while True:
                        rows = [await gw.db.get_request(i) for i in ids]
                        if all(r is not None and r.status in ENDED for r in rows):
                            return rows
                        assert time.monotonic() < deadline, Counter(r.status for r in rows if r is not None)
                        assert all(w.poll() is None for w in workers), "a worker died"
                        await asyncio.sleep(0.5)
                finally:
                    await gw.close()

            rows = asyncio.run(finished())
        finally:
            gate.set()
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    w.kill()
            log.close()
    assert Counter(r.status for r in rows) == {"succeeded": JOBS}
    assert all(r.runs == 1 for r in rows)  # claimed exactly once
    submits = Counter(body["input"]["prompt"] for _, _, _, body in fake.submits())
    assert len(submits) == JOBS and set(submits.values()) == {1}  # one upstream call per job, none lost
    by_worker = Counter(r.claimed_by for r in rows)
    assert len(by_worker) == 3, by_worker  # all three workers took part
