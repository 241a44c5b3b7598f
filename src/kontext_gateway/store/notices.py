"""Jobs' comings and goings announced across processes: PostgreSQL's NOTIFY, heard where it matters.

A job enqueued in one process (an API process's) is usually run in another (a worker's), and whoever
waits for it (a synchronous request, `Prefer: wait`) waits in the first. Without a signal, the worker
finds the job at its next poll (`job_poll_interval_s`) and the waiter its end at its next read. On
PostgreSQL the transaction that makes a job claimable notifies `CHANNEL` with the job's lane, and the
one that ends a job notifies `ENDED_CHANNEL` with its id (PostgreSQL delivers a notice at commit,
never before). Each serving process LISTENs on a connection of its own: its claim loops wake at once,
and so does a waiter of the job that ended. The polls stay, as the fallback: a notice sent while the
listening connection was down, a lease that ran out. SQLite has no such channel: polling alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

CHANNEL = "kontext_jobs"  # a job became claimable; payload: its lane
ENDED_CHANNEL = "kontext_ended"  # a job ended; payload: its id
ANY_LANE = ""  # a notice's payload when jobs of any lane became claimable
NOTIFY = text("SELECT pg_notify(:channel, :payload)")  # bound with notice(...)


def notice(lane: str = ANY_LANE, *, channel: str = CHANNEL) -> dict[str, str]:
    return {"channel": channel, "payload": lane}


def announce(conn: Connection, lane: str = ANY_LANE) -> None:
    """In a transaction that makes a job of `lane` claimable: tell the listeners once it commits."""
    if conn.dialect.name == "postgresql":
        conn.execute(NOTIFY, notice(lane))


def announce_end(conn: Connection, request_id: str) -> None:
    """In the transaction that ends a job: tell its waiters, wherever they are, once it commits."""
    if conn.dialect.name == "postgresql":
        conn.execute(NOTIFY, notice(request_id, channel=ENDED_CHANNEL))


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
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
        heard = self._new_job if channel == CHANNEL else self._ended
        if heard is not None:
            heard(payload)
