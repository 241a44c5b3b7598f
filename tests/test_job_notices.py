"""Across processes, at once rather than at the next poll (PostgreSQL's LISTEN/NOTIFY, on real
PostgreSQL): a job enqueued in one process wakes the claim loops of another, and a job that ended in
one wakes its waiter in another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from conftest import PATIENCE_S, ended_request, enqueue_job, next_in, throwaway_postgres_database
from fakes.common import serve
from fakes.replicate import FakeReplicate
from kontext_gateway import service
from kontext_gateway.config import Settings
from kontext_gateway.gateway import Gateway
from kontext_gateway.protocol import prediction_call
from kontext_gateway.store.db import Database
from kontext_gateway.store.notices import ANY_LANE, JobNotices
from kontext_gateway.store.records import JobStatus, Lane


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with throwaway_postgres_database("kontext_notices") as url:
        yield url


@pytest.fixture
async def two_processes(pg_url: str) -> AsyncIterator[tuple[Database, Database]]:
    """The database as two processes see it: one that enqueues, one that claims (each its own engine)."""
    url = Settings(database_url=pg_url).resolved_database_url()  # the gateway's driver: asyncpg
    api, worker = Database(url), Database(url)
    await api.start()
    await worker.start()
    try:
        yield api, worker
    finally:
        await worker.close()
        await api.close()


async def test_a_queued_job_is_announced_to_the_listeners_with_its_lane(
    two_processes: tuple[Database, Database],
) -> None:
    api, worker = two_processes
    heard: asyncio.Queue[str] = asyncio.Queue()
    notices = JobNotices(worker.engine, new_job=heard.put_nowait, retry_s=0.05)
    await notices.start()
    try:
        assert await next_in(heard) == ANY_LANE  # just connected: look once, something may have been missed
        await enqueue_job(api, lane=Lane.LOCAL)
        assert await next_in(heard) == "local"
        # Claimed by the process that enqueued it, or refused: nobody else has anything to claim.
        claimed = await enqueue_job(api, claimed_by="worker-a", lease_s=30)
        await enqueue_job(api, rejected={"error": {"message": "no", "type": "invalid_request_error"}})
        await enqueue_job(api, lane=Lane.HOSTED)
        assert await next_in(heard) == "hosted"  # the next notice is this one: none for the two before
        # Handed back by a worker shutting down: claimable again at once, by anyone.
        assert await api.release_leases("worker-a", [claimed]) == 1
        assert await next_in(heard) == ANY_LANE
        assert heard.empty()
    finally:
        await notices.close()


async def test_a_lost_listening_connection_is_made_again(two_processes: tuple[Database, Database]) -> None:
    api, worker = two_processes
    heard: asyncio.Queue[str] = asyncio.Queue()
    notices = JobNotices(worker.engine, new_job=heard.put_nowait, retry_s=0.05)
    await notices.start()
    try:
        assert await next_in(heard) == ANY_LANE
        async with api.engine.begin() as conn:  # the server ends the listening session (a restart, a proxy)
            ended = await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                )
            )
            assert ended.scalars().all() == [True]
        assert await next_in(heard) == ANY_LANE  # listening again, and looking once for what it missed
        await enqueue_job(api)
        assert await next_in(heard) == "hosted"
    finally:
        await notices.close()
    assert not notices.listening.is_set()


async def test_a_worker_process_runs_a_job_another_enqueued_without_polling(pg_url: str, tmp_path: Path) -> None:
    """The worker polls once an hour: only the notice can bring it the prediction in time."""
    fake = FakeReplicate(pending_polls=0)
    with serve(fake.app) as fake_url:
        common = dict(database_url=pg_url, replicate_api_token="r8_test", replicate_base_url=fake_url)
        api = Gateway(Settings(data_dir=tmp_path / "api", **common))  # type: ignore[arg-type]
        worker = Gateway(Settings(data_dir=tmp_path / "worker", job_poll_interval_s=3600, **common))  # type: ignore[arg-type]
        await api.start(workers=False)
        await worker.start()
        try:
            assert worker.notices is not None and api.notices is None  # only a process that claims listens
            await asyncio.wait_for(worker.notices.listening.wait(), PATIENCE_S)
            call = prediction_call("replicate/flux.1-kontext-pro", {"input": {"prompt": "a fox"}}).call
            rid = await api.images.submit(call, base_url="http://localhost/")
            row = await ended_request(api.db, rid)
            assert row.status == JobStatus.SUCCEEDED and row.claimed_by == worker.worker.id
        finally:
            await worker.close()
            await api.close()
    assert worker.notices is not None and not worker.notices.listening.is_set()


async def test_the_end_of_a_job_is_announced_with_its_id(two_processes: tuple[Database, Database]) -> None:
    api, worker = two_processes
    ended: asyncio.Queue[str] = asyncio.Queue()
    notices = JobNotices(api.engine, ended=ended.put_nowait, retry_s=0.05)  # where a waiter waits
    await notices.start()
    try:
        await asyncio.wait_for(notices.listening.wait(), PATIENCE_S)
        failed, canceled, running = [await enqueue_job(worker) for _ in range(3)]
        await worker.mark_running(running, provider="replicate")  # not an end: no notice
        error = {"message": "upstream down", "type": "server_error"}
        await worker.mark_failed(failed, error=error, attempts=[], duration_ms=5, ledger=False)
        assert await next_in(ended) == failed
        await api.request_cancel(canceled)  # never claimed: ended by the cancel itself
        assert await next_in(ended) == canceled
        assert ended.empty()
    finally:
        await notices.close()


async def test_a_waiter_hears_of_the_end_of_a_job_another_process_ran(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API process runs no jobs and reads the job once an hour: only the notice can end its wait in time."""
    monkeypatch.setattr(service, "OTHER_JOB_POLL_S", 3600.0)
    monkeypatch.setattr(service, "HEARD_JOB_POLL_S", 3600.0)
    fake = FakeReplicate(pending_polls=0)
    with serve(fake.app) as fake_url:
        common = dict(database_url=pg_url, replicate_api_token="r8_test", replicate_base_url=fake_url)
        api = Gateway(Settings(data_dir=tmp_path / "api", workers=0, local_workers=0, **common))  # type: ignore[arg-type]
        worker = Gateway(Settings(data_dir=tmp_path / "worker", **common))  # type: ignore[arg-type]
        await api.start()
        await worker.start()
        try:
            assert api.worker.concurrency == 0 and api.notices is not None
            await asyncio.wait_for(api.notices.listening.wait(), PATIENCE_S)
            call = prediction_call("replicate/flux.1-kontext-pro", {"input": {"prompt": "a fox"}}).call
            rid = await api.images.submit(call, base_url="http://localhost/", waiter=True)
            record = await asyncio.wait_for(api.images.wait(rid), PATIENCE_S)
            assert record.status == JobStatus.SUCCEEDED and record.claimed_by == worker.worker.id
        finally:
            await worker.close()
            await api.close()
