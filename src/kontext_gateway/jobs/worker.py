"""Workers: claim jobs from the database, run them, keep their leases, honour cancels.

Every gateway process runs jobs by default (the embedded mode); `kontext worker` runs them without
the HTTP API. Jobs come in two lanes, each with its own claim loop and limit: hosted jobs
(`Settings.workers` at once: they mostly wait on an upstream, so hundreds cost little) and
local-engine jobs (`Settings.local_workers`: the engine runs one at a time). A burst of hosted
requests never makes a local job wait for a slot, nor the reverse.

Several processes on one PostgreSQL database each claim a job exactly once (SKIP LOCKED). A worker
renews its leases while it runs jobs; a job whose worker died is claimed again once its lease runs
out, and resumes from its journal.
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
from ..store.records import Lane, RequestRow
from .runner import JobRunner

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, db: Database, runner: JobRunner, settings: Settings, *, concurrency: int | None = None) -> None:
        self.db = db
        self.runner = runner
        self.settings = settings
        self.id = f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        hosted = settings.workers if concurrency is None else concurrency
        self.lanes = {Lane.HOSTED: hosted, Lane.LOCAL: settings.local_lane(hosted)}
        # Jobs this process holds at once, both lanes; 0: it claims none (it only serves the API).
        self.concurrency = sum(self.lanes.values())
        self.running: dict[str, asyncio.Task[Any]] = {}
        self._slots = {lane: asyncio.Semaphore(n) for lane, n in self.lanes.items()}
        self._wake = {lane: asyncio.Event() for lane in Lane}
        self._claims: list[asyncio.Task[Any]] = []  # one claim loop per lane
        self._leases: asyncio.Task[Any] | None = None  # renews the running jobs' leases
        self.draining = False
        self._drain_deadline = 0.0  # loop time by which running jobs are handed back
        self._handed_back: set[str] = set()  # jobs stopped for another worker: leases to release

    def wake(self, lane: str = "") -> None:
        """A job of `lane` (of any, by default) was just enqueued, here or, told by the database, in
        another process: look now rather than at the next poll."""
        for name, event in self._wake.items():
            if not lane or name == lane:
                event.set()

    async def start(self) -> None:
        if self.concurrency:
            self._claims = [
                asyncio.create_task(self._claim_loop(lane), name=f"claims-{lane}")
                for lane, n in self.lanes.items()
                if n
            ]
            self._leases = asyncio.create_task(self._lease_loop(), name="leases")
            self.draining = False

    @property
    def claiming(self) -> bool:
        """Whether this process takes jobs now: its claim loops run and it is not draining."""
        return bool(self._claims) and not self.draining and not any(t.done() for t in self._claims)

    def drain(self, timeout_s: float) -> None:
        """Stop taking jobs now; those running have until `timeout_s` from now to finish (stop()).
        Called on SIGTERM, before the HTTP server stops: requests still waiting on a job keep being
        answered while it runs, and no new job starts here."""
        if self.draining:
            return
        self.draining = True
        self._drain_deadline = asyncio.get_running_loop().time() + timeout_s
        for loop in self._claims:
            loop.cancel()
        if self.running:
            log.info("draining: %d running jobs have %.0f s to finish", len(self.running), timeout_s)

    def hand_back_now(self) -> None:
        """Stop the running jobs at once for another worker to take up (a second SIGTERM while
        draining); their leases are released when stop() has seen them end."""
        for rid, task in list(self.running.items()):
            self.runner.stopping(rid, "shutdown")
            self._handed_back.add(rid)
            task.cancel()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop: no more claims; running jobs finish within the drain's deadline (or `grace_s` from now
        when not draining yet); the rest are handed back: cancelled here, their leases released, so
        another worker takes them up at once and resumes them from their journal (an upstream task
        already submitted is polled, not submitted again)."""
        self.drain(grace_s)
        for loop in self._claims:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        self._claims = []
        left = self._drain_deadline - asyncio.get_running_loop().time()
        if self.running and left > 0:
            await asyncio.wait(list(self.running.values()), timeout=left)
        self.hand_back_now()
        for task in list(self.running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._leases is not None:
            self._leases.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._leases
            self._leases = None
        handed_back, self._handed_back = list(self._handed_back), set()
        if handed_back:
            try:
                await self.db.release_leases(self.id, handed_back)
            except Exception:  # the leases then run out as after a crash
                log.exception("releasing the leases of %d jobs failed", len(handed_back))
            log.info("handed %d unfinished jobs back to the queue", len(handed_back))

    def runs(self, request_id: str) -> bool:
        return request_id in self.running

    # -- hand-off: a job enqueued in this process, with a slot free in its lane, is run at once ----------
    # Its row is written already claimed by this worker (no claim statement, no wait for the claim
    # loop); the claim loop only ever takes what is queued. A slot taken here is a slot the loop does
    # not have, so the lane's limit holds either way.

    def has_room(self, lane: Lane) -> bool:
        """Whether a job of `lane` enqueued now would start at once in this process."""
        return self.claiming and self.lanes[lane] > 0 and not self._slots[lane].locked()

    async def reserve(self, lane: Lane) -> str | None:
        """Take a free slot of `lane` for a job about to be enqueued here: this worker's id (the row's
        `claimed_by`), or None when the lane is full (or waited on), or not run in this process."""
        if not self.has_room(lane):
            return None
        await self._slots[lane].acquire()  # at once: a semaphore that is not locked has a slot and no waiter
        return self.id

    def unreserve(self, lane: Lane) -> None:
        """The job could not be enqueued after all: its slot goes back."""
        self._slots[lane].release()

    def hand(self, record: RequestRow) -> None:
        """Run a job enqueued already claimed by this worker, in the slot reserve() took."""
        metrics.queue_wait(0.0)
        task = asyncio.create_task(self._run(record, self._slots[record.lane]), name=f"job-{record.id}")
        self.running[record.id] = task

    def cancel(self, request_id: str) -> bool:
        """Cancel a job this process is running, at once. False when another process has it."""
        task = self.running.get(request_id)
        if task is None:
            return False
        self.runner.stopping(request_id, "requested")
        task.cancel()
        return True

    async def _claim_loop(self, lane: Lane) -> None:
        """One loop per lane claims, up to the lane's limit of its jobs run (with those handed over):
        one claim per job, and none while full (several loops woken together would each run a claim
        for the same one job)."""
        settings = self.settings
        slots = self._slots[lane]
        wake = self._wake[lane]
        while True:
            # A slot is held only while a claim is tried: an idle loop leaves every slot free for
            # the jobs this process hands over itself (reserve()).
            await slots.acquire()
            wake.clear()  # before the claim: a job enqueued during it is not missed
            record = None
            try:
                record = await self.db.claim_next(self.id, settings.job_lease_s, lane)
            except Exception:
                log.exception("claiming a job failed")
            if record is None:
                slots.release()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(settings.job_poll_interval_s):
                        await wake.wait()
                continue
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
