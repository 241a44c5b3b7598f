"""New jobs announced across processes: PostgreSQL's NOTIFY, heard by the processes that claim jobs.

A job enqueued in one process (an API process's) is usually claimed in another (a worker's). Without a
signal, that worker finds it at its next poll (`job_poll_interval_s`). On PostgreSQL the transaction
that makes a job claimable also notifies channel `CHANNEL` with the job's lane (PostgreSQL delivers
it at commit, never before), and each process that claims jobs LISTENs on a connection of its own and
wakes that lane's claim loop at once. The polls stay, as the fallback: a notice sent while the
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

CHANNEL = "kontext_jobs"
ANY_LANE = ""  # a notice's payload when jobs of any lane became claimable
NOTIFY = text("SELECT pg_notify(:channel, :lane)")  # bound with notice(lane)


def notice(lane: str = ANY_LANE) -> dict[str, str]:
    return {"channel": CHANNEL, "lane": lane}


def announce(conn: Connection, lane: str = ANY_LANE) -> None:
    """In a transaction that makes a job of `lane` claimable: tell the listeners once it commits."""
    if conn.dialect.name == "postgresql":
        conn.execute(NOTIFY, notice(lane))


class JobNotices:
    """Keeps one connection of `engine`'s LISTENing on `CHANNEL` and calls `heard(lane)` for each notice
    (`ANY_LANE`, too, each time it has just connected: notices may have been missed meanwhile). A lost
    connection is made again after `retry_s`."""

    def __init__(self, engine: AsyncEngine, heard: Callable[[str], None], *, retry_s: float = 5.0) -> None:
        self._engine = engine
        self._heard = heard
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
                await raw.add_listener(CHANNEL, self._notice)
                self.listening.set()
                self._heard(ANY_LANE)
                await lost.wait()
            finally:
                self.listening.clear()
                # Never back to the pool still listening: closed, the pool makes a fresh one.
                await conn.invalidate()

    def _notice(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._heard(payload)
