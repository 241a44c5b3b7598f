"""A SQLite file's own thread: transactions run there whole, one hop from the event loop each.

The async driver (aiosqlite) hops to its thread several times per statement, which cost more CPU than
the SQL. Here a transaction is a blocking function of a connection, handed to one thread that owns one
connection for its whole life: no pool checkout, no reset-on-return ROLLBACK after each COMMIT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy import Connection

from kontext_gateway.store.engine import make_sqlite_thread_engine

T = TypeVar("T")


class SQLiteThread:
    def __init__(self, url: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kontext-sqlite")
        self._engine = make_sqlite_thread_engine(url)
        self._conn: Connection | None = None  # opened on the thread, at the first transaction

    async def run(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` as one transaction: committed when it returns, rolled back if it raises."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._transaction, work)

    async def close(self) -> None:
        """Close the connection once the transactions already handed over are done (queued behind
        them, on the thread that used it)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._dispose)
        self._executor.shutdown(wait=True)

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
