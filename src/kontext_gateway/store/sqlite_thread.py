"""A SQLite file's transactions: at once on the event loop when the file is free, else on a thread of its own.

The async driver (aiosqlite) hops to its thread several times per statement, which cost more CPU than
the SQL. Here a transaction is a blocking function of a connection, run whole. The job's transactions
are a few single-row statements in a file the page cache holds, shorter than a hop to another thread
and back (the hand-off wakes a sleeping thread, the answer wakes the loop, and the two then contend
for the GIL), so the first try is on the caller's thread, on a connection that never waits: BEGIN
IMMEDIATE with no busy timeout, and no WAL checkpoints (they sync files to disk). When another
connection holds the write lock, or transactions already wait for the thread, the transaction goes to
the thread (`ThreadQueue`: the hop without an executor's machinery), whose own connection waits for
the lock as long as the busy timeout allows; the thread also checkpoints what the loop's connection
wrote. Each connection is kept for the object's whole life: no pool checkout, no reset-on-return
ROLLBACK after each COMMIT.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, RootTransaction

from kontext_gateway.store.engine import is_busy, make_sqlite_thread_engine
from kontext_gateway.store.thread_queue import ThreadQueue

T = TypeVar("T")

log = logging.getLogger(__name__)

# Commits on the loop's connection between two checkpoints by the thread. A job's commit adds about
# nine pages to the WAL (its row and the indexes over it): some 1,800 pages between checkpoints, the
# same order as SQLite's own automatic checkpoint (every 1,000 pages) on any other connection.
CHECKPOINT_EVERY = 200


class SQLiteThread:
    def __init__(self, url: str) -> None:
        self._engine = make_sqlite_thread_engine(url)
        self._conn: Connection | None = None  # opened on the thread, at the first transaction there
        self._thread = ThreadQueue("kontext-sqlite")  # one thread, for as long as the database is open
        self._here_engine = make_sqlite_thread_engine(url, waits=False)
        self._here_conn: Connection | None = None  # the loop's, opened at the first transaction
        self._handed_over = 0  # transactions handed to the thread whose callers still wait
        self._since_checkpoint = 0  # commits on the loop's connection since the last checkpoint

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        """Its thread, once a transaction or checkpoint started it; none once closed."""
        return self._thread.threads

    async def run(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` as one transaction: committed when it returns, rolled back if it raises.
        A caller cancelled before the thread reaches its call leaves the transaction unrun."""
        if self._handed_over == 0:  # none waits for the thread: this one would not overtake another
            began = self._begin_here()
            if began is not None:
                conn, transaction = began
                with transaction:
                    result = work(conn)
                self._committed_here()
                return result
        self._handed_over += 1
        try:
            return await self._thread.call(lambda: self._transaction(work))
        finally:
            self._handed_over -= 1

    async def close(self) -> None:
        """Close the connections once the transactions already handed over are done (queued behind
        them, on the thread that used it), then end the thread."""
        if self._here_conn is not None:
            self._here_conn.close()
            self._here_conn = None
        self._here_engine.dispose()
        await self._thread.call(self._dispose)
        await self._thread.close()

    def _begin_here(self) -> tuple[Connection, RootTransaction] | None:
        """The loop's connection with its transaction begun (IMMEDIATE), or None when another
        connection holds the write lock (nothing was done)."""
        conn = self._here_conn
        if conn is None:
            conn = self._here_conn = self._here_engine.connect()
        try:
            return conn, conn.begin()
        except sqlite3.OperationalError as error:  # from the begin event: the driver's own, unwrapped
            if is_busy(error):
                return None
            raise

    def _committed_here(self) -> None:
        self._since_checkpoint += 1
        if self._since_checkpoint >= CHECKPOINT_EVERY:
            self._since_checkpoint = 0
            self._thread.call(self._checkpoint)  # nobody awaits it: it logs its own failure

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        conn = self._connection()
        with conn.begin():
            return work(conn)

    def _connection(self) -> Connection:
        if self._conn is None:
            # Kept: after a connection-level error (invalidated), SQLAlchemy opens a new one on next use.
            self._conn = self._engine.connect()
        return self._conn

    def _checkpoint(self) -> None:
        """Copy the WAL's committed pages into the database file (PASSIVE: waits for no reader or
        writer), as SQLite's automatic checkpoint would have on the loop's connection."""
        try:
            dbapi_connection = self._connection().connection.dbapi_connection
            assert dbapi_connection is not None, "a kept connection is open"
            dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception:
            log.warning("checkpointing the SQLite WAL failed; next try in %d commits", CHECKPOINT_EVERY, exc_info=True)

    def _dispose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()
