"""Workers: claim jobs from the database, run them, keep their leases, honour cancels.

Every gateway process runs `Settings.workers` claim loops by default (the embedded mode);
`kontext worker` runs them without the HTTP API. Several processes on one PostgreSQL database each
claim a job exactly once (SKIP LOCKED). A worker renews its leases while it runs jobs; a job whose
worker died is claimed again once its lease runs out, and resumes from its journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Any

from .. import logs, metrics
from ..config import Settings
from ..store.db import Database
from ..store.records import RequestRow
from .runner import JobRunner

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, db: Database, runner: JobRunner, settings: Settings, *, concurrency: int | None = None) -> None:
        self.db = db
        self.runner = runner
        self.settings = settings
        self.id = f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.concurrency = settings.workers if concurrency is None else concurrency
        self.running: dict[str, asyncio.Task[Any]] = {}
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[Any]] = []

    def wake(self) -> None:
        """A job was just enqueued in this process: look now rather than at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        if self.concurrency:
            self._loops = [
                asyncio.create_task(self._claim_loop(), name="claims"),
                asyncio.create_task(self._lease_loop(), name="leases"),
            ]

    async def stop(self) -> None:
        for loop in self._loops:
            loop.cancel()
        for rid, task in list(self.running.items()):
            self.runner.stopping(rid, "shutdown")
            task.cancel()
        for task in [*self._loops, *self.running.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loops = []

    def cancel(self, request_id: str) -> bool:
        """Cancel a job this process is running, at once. False when another process has it."""
        task = self.running.get(request_id)
        if task is None:
            return False
        self.runner.stopping(request_id, "requested")
        task.cancel()
        return True

    async def _claim_loop(self) -> None:
        """One loop claims, up to `concurrency` jobs run: one claim per job, and none while full
        (several loops woken together would each run a claim for the same one job)."""
        settings = self.settings
        slots = asyncio.Semaphore(self.concurrency)
        while True:
            await slots.acquire()
            record = None
            while record is None:
                try:
                    record = await self.db.claim_next(self.id, settings.job_lease_s)
                except Exception:
                    log.exception("claiming a job failed")
                if record is None:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(settings.job_poll_interval_s):
                            await self._wake.wait()
            if record.runs == 1 and record.started_at:  # not a resumed job
                metrics.queue_wait((record.started_at - record.created_at).total_seconds())
            task = asyncio.create_task(self._run(record, slots), name=f"job-{record.id}")
            self.running[record.id] = task

    async def _run(self, record: RequestRow, slots: asyncio.Semaphore) -> None:
        # Every line the runner, router and providers log for this job carries its ids.
        with logs.bind(request_id=record.id, key_id=record.key_id):
            try:
                status, provider = await self.runner.run(record)
                log.info("job %s %s", record.id, status, extra={"provider": provider, "outcome": status})
            except asyncio.CancelledError:
                pass  # shutdown or lost lease: the runner left the job for the next worker
            except Exception:
                log.exception("job %s crashed its runner", record.id)
            finally:
                self.running.pop(record.id, None)
                slots.release()

    async def _lease_loop(self) -> None:
        settings = self.settings
        while True:
            await asyncio.sleep(settings.job_lease_s / 3)
            ids = list(self.running)
            try:
                held = await self.db.renew_leases(self.id, ids, settings.job_lease_s)
            except Exception:
                log.exception("renewing leases failed")
                continue
            for rid in ids:
                task = self.running.get(rid)
                if task is None or task.done():
                    continue
                if rid not in held:
                    self.runner.stopping(rid, "lease lost")  # another worker has it now
                    task.cancel()
                elif held[rid]:
                    self.runner.stopping(rid, "requested")
                    task.cancel()
