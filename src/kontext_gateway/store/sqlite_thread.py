"""A SQLite file's own thread: transactions run there whole, one hop from the event loop each.

The async driver (aiosqlite) hops to its thread several times per statement, which cost more CPU than
the SQL. Here a transaction is a blocking function of a connection, handed to one thread that owns one
connection for its whole life (`ThreadQueue`: the hop without an executor's machinery): no pool
checkout, no reset-on-return ROLLBACK after each COMMIT.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection

from kontext_gateway.store.engine import make_sqlite_thread_engine
from kontext_gateway.store.thread_queue import ThreadQueue

T = TypeVar("T")


class SQLiteThread:
    def __init__(self, url: str) -> None:
        self._engine = make_sqlite_thread_engine(url)
        self._conn: Connection | None = None  # opened on the thread, at the first transaction
        self._thread = ThreadQueue("kontext-sqlite")  # one thread, for as long as the database is open

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        """Its thread, once the first transaction started it; none once closed."""
        return self._thread.threads

    async def run(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` as one transaction: committed when it returns, rolled back if it raises.
        A caller cancelled before the thread reaches its call leaves the transaction unrun."""
        return await self._thread.call(lambda: self._transaction(work))

    async def close(self) -> None:
        """Close the connection once the transactions already handed over are done (queued behind
        them, on the thread that used it), then end the thread."""
        await self._thread.call(self._dispose)
        await self._thread.close()

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            # Kept: after a connection-level error (invalidated), SQLAlchemy opens a new one on next use.
            conn = self._conn = self._engine.connect()
        with conn.begin():
            return work(conn)

    def _dispose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()
