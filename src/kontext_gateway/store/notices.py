"""Jobs' comings and goings announced across processes: PostgreSQL's NOTIFY, heard where it matters.

A job enqueued in one process (an API process's) is usually run in another (a worker's), and whoever
waits for it (a synchronous request, `Prefer: wait`) waits in the first. Without a signal, the worker
finds the job at its next poll (`job_poll_interval_s`) and the waiter its end at its next read. On
PostgreSQL, once the transaction that makes a job claimable has committed, `CHANNEL` is notified with
the job's lane, and once the one that ends a job has, `ENDED_CHANNEL` with its id. Each serving process
LISTENs on a connection of its own: its claim loops wake at once, and so does a waiter of the job that
ended. The polls stay, as the fallback: a notice lost to a crash just after a commit or sent while the
listening connection was down, a lease that ran out. SQLite has no such channel: processes sharing
a SQLite file look for the same news instead (sqlite_watch.py).

The notices go in transactions of their own, not in the jobs': PostgreSQL serializes the commits of
every transaction that notifies, fsync included, and creating jobs at hundreds a second through that
one door cost a quarter to a third of the creation throughput. `Announcer` sends what piled up while its last notice was
being committed, in one transaction, and at most one every `Announcer.gap_s` (0.1 s): a notice
after a quiet spell goes at once, and under load ten a second carry every job's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ..tasks import stop_task

log = logging.getLogger(__name__)

CHANNEL = "kontext_jobs"  # a job became claimable; payload: its lane
ENDED_CHANNEL = "kontext_ended"  # a job ended; payload: its id
ANY_LANE = ""  # a notice's payload when jobs of any lane became claimable
NOTIFY = text("SELECT pg_notify(:channel, :payload)")
MAX_PAYLOAD = 7000  # PostgreSQL takes up to 8000 bytes per notice: ids beyond go in the next one


class Announcer:
    """Sends notices in transactions of its own, one at a time and `gap_s` apart at least: what is
    asked meanwhile goes in the next, lanes once each, ended jobs' ids joined by commas. Fire and
    forget: a notice that fails is logged (the listeners' polls find the jobs anyway)."""

    def __init__(self, engine: AsyncEngine, *, gap_s: float = 0.1) -> None:
        self._engine = engine
        self._gap_s = gap_s
        self._last = -gap_s  # loop time of the last send
        self._lanes: set[str] = set()
        self._ended: list[str] = []
        self._sending: asyncio.Task[None] | None = None

    def new_job(self, lane: str = ANY_LANE) -> None:
        self._lanes.add(lane)
        self._kick()

    def ended(self, request_id: str) -> None:
        self._ended.append(request_id)
        self._kick()

    async def close(self) -> None:
        """Returns once what was asked is sent."""
        while self._sending is not None:
            await asyncio.shield(self._sending)

    def _kick(self) -> None:
        if self._sending is None:
            self._sending = asyncio.get_running_loop().create_task(self._send(), name="job-notices-out")

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._lanes or self._ended:
                await asyncio.sleep(max(0.0, self._last + self._gap_s - loop.time()))
                self._last = loop.time()
                lanes, self._lanes = self._lanes, set()
                ended, self._ended = self._ended, []
                notices = [(CHANNEL, lane) for lane in sorted(lanes)] + [(ENDED_CHANNEL, p) for p in _joined(ended)]
                try:
                    async with self._engine.begin() as conn:
                        for channel, payload in notices:
                            await conn.execute(NOTIFY, {"channel": channel, "payload": payload})
                except Exception as exc:
                    log.warning("could not send %d job notices (%s): the listeners' polls find them", len(notices), exc)
        finally:
            self._sending = None


def _joined(ids: list[str]) -> list[str]:
    """The ids as few comma-joined payloads as fit."""
    payloads, current = [], ""
    for rid in ids:
        if current and len(current) + 1 + len(rid) > MAX_PAYLOAD:
            payloads.append(current)
            current = ""
        current = f"{current},{rid}" if current else rid
    return [*payloads, current] if current else payloads


class JobNotices:
    """Keeps one connection of `engine`'s LISTENing and calls `new_job(lane)` for each job made claimable
    (and `new_job(ANY_LANE)` each time it has just connected: notices may have been missed meanwhile),
    `ended(request_id)` for each job that ended; either may be None (not listened for). A lost
    connection is made again after `retry_s`."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        new_job: Callable[[str], None] | None = None,
        ended: Callable[[str], None] | None = None,
        retry_s: float = 5.0,
    ) -> None:
        self._engine = engine
        self._new_job = new_job
        self._ended = ended
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while a connection listens

    @staticmethod
    def can_listen(engine: AsyncEngine) -> bool:
        """Whether `engine` reaches a database that notifies, through the driver this listens with."""
        return engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg"

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="job-notices")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _listen(self) -> None:
        while True:
            try:
                await self._listen_once()
                log.warning("the connection listening for new jobs was lost: listening again in %g s", self._retry_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot listen for new jobs (%s): polling only, trying again in %g s", exc, self._retry_s)
            await asyncio.sleep(self._retry_s)

    async def _listen_once(self) -> None:
        """Listens on one connection until it is lost."""
        async with self._engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection  # asyncpg's own connection
            if raw is None:
                raise RuntimeError("the pool handed out a connection without a driver connection")
            lost = asyncio.Event()
            raw.add_termination_listener(lambda _conn: lost.set())
            try:
                if self._new_job is not None:
                    await raw.add_listener(CHANNEL, self._notice)
                if self._ended is not None:
                    await raw.add_listener(ENDED_CHANNEL, self._notice)
                self.listening.set()
                if self._new_job is not None:
                    self._new_job(ANY_LANE)
                await lost.wait()
            finally:
                self.listening.clear()
                # Never back to the pool still listening: closed, the pool makes a fresh one.
                await conn.invalidate()

    def _notice(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == CHANNEL and self._new_job is not None:
            self._new_job(payload)
        elif channel == ENDED_CHANNEL and self._ended is not None:
            for request_id in payload.split(","):
                self._ended(request_id)
