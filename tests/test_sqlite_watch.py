"""Across processes on one SQLite file, at once rather than at the next poll: a job queued by an API
process wakes a worker process's claim loops, and a job that ended in a worker process wakes its
waiter in the API process (store/sqlite_watch.py; PostgreSQL's notices are test_job_notices.py's)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import PATIENCE_S, await_until, ended_request, enqueue_job, next_in
from fakes.common import serve
from fakes.replicate import FakeReplicate
from kontext_gateway import service
from kontext_gateway.config import Settings
from kontext_gateway.gateway import Gateway
from kontext_gateway.protocol import ImageCall, prediction_call
from kontext_gateway.store.db import Database
from kontext_gateway.store.records import JobStatus, Lane
from kontext_gateway.store.sqlite_watch import SQLiteWatch

QUICK_S = 0.01  # the tests' watches look this often


@pytest.fixture
async def two_processes(tmp_path: Path) -> AsyncIterator[tuple[Database, Database, Path]]:
    """One SQLite file as two processes see it, each with its own connections: one that enqueues, one
    that claims; and the file."""
    path = tmp_path / "shared.db"
    url = Settings(database_url=f"sqlite:///{path}").resolved_database_url()
    api, worker = Database(url), Database(url)
    await api.start()
    await worker.start()
    try:
        yield api, worker, path
    finally:
        await worker.close()
        await api.close()


async def looked_again(watch: SQLiteWatch) -> None:
    """Until the watch has asked what changed once more (after the change just committed)."""
    before = watch.looks
    assert await await_until(lambda: watch.looks > before, interval=QUICK_S)


async def test_a_worker_watch_tells_the_lanes_that_have_a_queued_job(
    two_processes: tuple[Database, Database, Path],
) -> None:
    api, worker, path = two_processes
    heard: asyncio.Queue[str] = asyncio.Queue()
    watch = SQLiteWatch(path, new_job=heard.put_nowait, interval_s=QUICK_S)
    await watch.start()
    try:
        local = await enqueue_job(api, lane=Lane.LOCAL)
        assert await next_in(heard) == "local"
        claimed = await worker.claim_next("worker-b", 30, Lane.LOCAL)
        assert claimed is not None and claimed.id == local
        # Claimed by the process that enqueued it, or refused: nothing queued, nothing told.
        await looked_again(watch)
        while not heard.empty():
            heard.get_nowait()
        await enqueue_job(api, claimed_by="worker-a", lease_s=30)
        await enqueue_job(api, rejected={"error": {"message": "no", "type": "invalid_request_error"}})
        await looked_again(watch)
        assert heard.empty()
        await enqueue_job(api, lane=Lane.HOSTED)
        assert await next_in(heard) == "hosted"
    finally:
        await watch.close()


async def test_a_waiter_watch_tells_the_ends_of_the_jobs_waited_on_only(
    two_processes: tuple[Database, Database, Path],
) -> None:
    api, worker, path = two_processes
    ended: asyncio.Queue[str] = asyncio.Queue()
    failed, canceled, running, not_waited = [await enqueue_job(api) for _ in range(4)]
    waited = {failed, canceled, running}
    someone_waits = asyncio.Event()
    watch = SQLiteWatch(
        path, ended=ended.put_nowait, waited=lambda: waited, someone_waits=someone_waits, interval_s=QUICK_S
    )
    await watch.start()
    try:
        error = {"message": "upstream down", "type": "server_error"}
        await worker.mark_failed(not_waited, error=error, attempts=[], duration_ms=5, ledger=False)
        await worker.mark_running(running, provider="replicate")  # not an end
        await worker.mark_failed(failed, error=error, attempts=[], duration_ms=5, ledger=False)
        assert await next_in(ended) == failed
        waited.discard(failed)  # its waiter has read it and gone
        await worker.request_cancel(canceled)  # never claimed: ended by the cancel itself
        assert await next_in(ended) == canceled
        waited.discard(canceled)
        assert ended.empty()  # each end told once: nothing changed since
        # Nobody waits: the watch sleeps until someone does, and then sees what ended meanwhile.
        waited.clear()
        await asyncio.sleep(QUICK_S * 5)
        looks = watch.looks
        await worker.mark_failed(running, error=error, attempts=[], duration_ms=5, ledger=False)
        await asyncio.sleep(QUICK_S * 5)
        assert watch.looks == looks and ended.empty()
        waited.add(running)
        someone_waits.set()
        assert await next_in(ended) == running
    finally:
        await watch.close()


@contextlib.asynccontextmanager
async def split_deployment(
    tmp_path: Path, *, pending_polls: int = 0, **worker_settings: object
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """An API process (`serve --workers 0`) and a worker process (`kontext worker`) sharing one data
    directory, its SQLite file included, on a fake Replicate whose tasks take `pending_polls` polls."""
    fake = FakeReplicate(pending_polls=pending_polls)
    with serve(fake.app) as fake_url:
        common = dict(data_dir=tmp_path, replicate_api_token="r8_test", replicate_base_url=fake_url)
        api = Gateway(Settings(workers=0, local_workers=0, **common))  # type: ignore[arg-type]
        worker = Gateway(Settings(**common, **worker_settings))  # type: ignore[arg-type]
        await api.start()
        await worker.start(api=False)
        try:
            yield api, worker
        finally:
            await worker.close()
            await api.close()


def a_prediction() -> ImageCall:
    return prediction_call("replicate/flux.1-kontext-pro", {"input": {"prompt": "a fox"}}).call


async def test_a_worker_process_runs_a_job_the_api_process_queued_without_polling(tmp_path: Path) -> None:
    """The worker polls once an hour: only the watch can bring it the prediction in time."""
    async with split_deployment(tmp_path, job_poll_interval_s=3600) as (api, worker):
        assert worker.watch is not None and worker.notices is None
        rid = await api.images.submit(a_prediction(), base_url="http://localhost/")
        row = await ended_request(api.db, rid)
        assert row.status == JobStatus.SUCCEEDED and row.claimed_by == worker.worker.id


async def test_a_waiter_sees_the_end_of_a_job_a_worker_process_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API process reads the job once an hour and the worker polls for jobs once an hour: only
    the watches can end the wait in time."""
    monkeypatch.setattr(service, "OTHER_JOB_POLL_S", 3600.0)
    monkeypatch.setattr(service, "HEARD_JOB_POLL_S", 3600.0)
    async with split_deployment(tmp_path, job_poll_interval_s=3600) as (api, worker):
        assert api.worker.concurrency == 0 and api.watch is not None
        rid = await api.images.submit(a_prediction(), base_url="http://localhost/", waiter=True)
        record = await asyncio.wait_for(api.images.wait(rid), PATIENCE_S)
        assert record.status == JobStatus.SUCCEEDED and record.claimed_by == worker.worker.id


async def test_a_waiter_that_hears_of_ends_reads_its_job_only_once_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a watch the waiter would read the job every 10 ms (a hundred reads a second); with
    one, only when the watch says it ended: a crowd of waiters costs the API process next to nothing."""
    monkeypatch.setattr(service, "OTHER_JOB_POLL_S", 0.01)
    monkeypatch.setattr(service, "HEARD_JOB_POLL_S", 3600.0)
    # The job takes the worker a few polls: half a second or more.
    async with split_deployment(tmp_path, pending_polls=6) as (api, _worker):
        reads = 0
        get_request = api.db.get_request

        async def counted(request_id: str) -> object:
            nonlocal reads
            reads += 1
            return await get_request(request_id)

        monkeypatch.setattr(api.db, "get_request", counted)
        rid = await api.images.submit(a_prediction(), base_url="http://localhost/", waiter=True)
        watch = api.watch
        assert watch is not None and await await_until(lambda: watch.watching_ends)  # connected
        record = await asyncio.wait_for(api.images.wait(rid), PATIENCE_S)
        assert record.status == JobStatus.SUCCEEDED
        assert reads <= 2, f"{reads} reads of one job"


async def test_the_embedded_default_watches_nothing(tmp_path: Path) -> None:
    """One process that serves the API and runs its jobs hears of them in-process: no watch, no wake-ups."""
    gateway = Gateway(Settings(data_dir=tmp_path))
    await gateway.start()
    try:
        assert gateway.worker.concurrency and gateway.watch is None and gateway.notices is None
    finally:
        await gateway.close()
