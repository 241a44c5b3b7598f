"""A SQLite file's own thread: transactions run there whole, one hop from the event loop each.

The async driver (aiosqlite) hops to its thread several times per statement, which cost more CPU than
the SQL. Here a transaction is a blocking function of a connection, handed to one thread that owns one
connection for its whole life: no pool checkout, no reset-on-return ROLLBACK after each COMMIT.

The hop itself is a queue the thread reads and the caller's asyncio future, settled from the thread.
`loop.run_in_executor` would add a concurrent.futures future per call, a work item, callbacks chaining
the two futures and the executor's locks: about twice the CPU of the hop for nothing used here
(`benchmarks/sqlite_transaction.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection

from kontext_gateway.store.engine import make_sqlite_thread_engine

T = TypeVar("T")

# What the thread reads: a call and the future that waits for it, or None to stop.
_Call = tuple["asyncio.Future[Any]", Callable[[], Any]]


class SQLiteThread:
    def __init__(self, url: str) -> None:
        self._engine = make_sqlite_thread_engine(url)
        self._conn: Connection | None = None  # opened on the thread, at the first transaction
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # started by the first call

    async def run(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` as one transaction: committed when it returns, rolled back if it raises.
        A caller cancelled before the thread reaches its call leaves the transaction unrun."""
        return await self._call(lambda: self._transaction(work))

    async def close(self) -> None:
        """Close the connection once the transactions already handed over are done (queued behind
        them, on the thread that used it), then end the thread."""
        if self._thread is None:
            self._engine.dispose()
            return
        await self._call(self._dispose)
        self._calls.put(None)
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join)

    def _call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._thread is None:
            # A daemon: an idle thread never holds up the interpreter's exit (close() ends it anyway).
            self._thread = threading.Thread(target=self._serve, name="kontext-sqlite", daemon=True)
            self._thread.start()
        self._calls.put((future, fn))
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn = call
            if future.cancelled():  # read across threads: at worst a call cancelled just now still runs
                continue
            try:
                result, error = fn(), None
            except BaseException as exc:  # whatever it is, it is the caller's to see
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                future.get_loop().call_soon_threadsafe(_settle, future, result, error)

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


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the loop: hand the thread's answer to the caller, unless it stopped waiting."""
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
