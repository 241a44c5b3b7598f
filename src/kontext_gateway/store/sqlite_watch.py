"""Jobs' comings and goings seen across processes that share one SQLite file, by looking.

PostgreSQL tells the other processes when a job is queued or has ended (notices.py). SQLite has no
channel between processes: an API process in front of `kontext worker` processes saw the end of a job
it waits on at its waiter's next read (every 0.2 s), and a worker process saw a job queued by the API
at its next claim (every `job_poll_interval_s`). `SQLiteWatch` looks instead, every `interval_s`, on a
connection of its own: `PRAGMA data_version` changes when another connection has committed to the
file (it reads SQLite's shared-memory WAL index: no page, no lock, a few microseconds), and only then
does it ask what matters to this process: which lanes have a queued job (`new_job(lane)`: their claim
loops wake), and which of the jobs waited on here have ended (`ended(id)`: their waiters wake and read
the record). With no claim loops to tell and nobody waiting, it does not wake at all. The polls stay,
as the fallback.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Collection
from pathlib import Path

from ..tasks import stop_task
from .records import ENDED, JobStatus

log = logging.getLogger(__name__)

INTERVAL_S = 0.05  # between two looks: a job or an end is seen 25 ms after its commit, on average
_IDS_PER_QUERY = 500  # ids in one `IN (...)`, well under SQLite's limit on bound parameters
_QUEUED_LANES = "SELECT DISTINCT lane FROM requests WHERE status = ?"
_ENDED = tuple(sorted(ENDED))
_ENDED_AMONG = "SELECT id FROM requests WHERE status IN ({}) AND id IN ({{}})".format(", ".join("?" * len(_ENDED)))


class SQLiteWatch:
    """Looks at the SQLite file at `path` while there is something to look for: claim loops to tell
    (`new_job`, when given) or jobs waited on (`waited()`, the ids; `someone_waits` is set when one is
    added). Either callback may be None (not watched for)."""

    def __init__(
        self,
        path: Path,
        *,
        new_job: Callable[[str], None] | None = None,
        ended: Callable[[str], None] | None = None,
        waited: Callable[[], Collection[str]] = tuple,
        someone_waits: asyncio.Event | None = None,
        interval_s: float = INTERVAL_S,
        retry_s: float = 5.0,
    ) -> None:
        self._path = path
        self._new_job = new_job
        self._ended = ended
        self._waited = waited
        self._someone_waits = someone_waits or asyncio.Event()
        self._interval_s = interval_s
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self.looks = 0  # how often it asked what changed (the file had changed since the last look)

    @property
    def watching_ends(self) -> bool:
        """Whether the ends of the jobs waited on are being looked for now (a connection is open)."""
        return self._ended is not None and self._connected

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="sqlite-watch")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _watch(self) -> None:
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "cannot watch %s for jobs (%s): polling only, trying again in %g s", self._path, exc, self._retry_s
                )
            await asyncio.sleep(self._retry_s)

    async def _watch_once(self) -> None:
        # Autocommit: each statement is a read of its own, and nothing is ever held between looks.
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=0")  # on the event loop: never wait for a lock
            seen = _data_version(conn)
            self._look(conn)  # for what happened before this connection was made
            self._connected = True
            while True:
                if self._new_job is None and not self._waited():
                    self._someone_waits.clear()
                    if not self._waited():
                        await self._someone_waits.wait()
                await asyncio.sleep(self._interval_s)
                try:
                    version = _data_version(conn)
                    if version == seen:
                        continue
                    self._look(conn)
                except sqlite3.OperationalError as exc:  # busy or locked for a moment: look again next time
                    log.debug("looking at %s for jobs: %s", self._path, exc)
                    continue
                seen = version
        finally:
            self._connected = False
            conn.close()

    def _look(self, conn: sqlite3.Connection) -> None:
        self.looks += 1
        if self._new_job is not None:
            self._tell_queued(conn)
        if self._ended is not None and (ids := list(self._waited())):
            self._tell_ended(conn, ids)

    def _tell_queued(self, conn: sqlite3.Connection) -> None:
        assert self._new_job is not None
        for (lane,) in conn.execute(_QUEUED_LANES, (JobStatus.STARTING.value,)).fetchall():
            self._new_job(lane)

    def _tell_ended(self, conn: sqlite3.Connection, ids: list[str]) -> None:
        assert self._ended is not None
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            query = _ENDED_AMONG.format(", ".join("?" * len(chunk)))
            for (request_id,) in conn.execute(query, (*_ENDED, *chunk)).fetchall():
                self._ended(request_id)


def _data_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA data_version").fetchone()
    return int(row[0])
