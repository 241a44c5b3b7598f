"""Engine factories: the per-backend settings every connection needs, in one place."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

# Execution option asking for `BEGIN IMMEDIATE` on SQLite: take the write lock up front.
SQLITE_BEGIN_IMMEDIATE = "kontext_sqlite_begin_immediate"

_SQLITE_BUSY_TIMEOUT_S = 15.0
_SQLITE_PRAGMAS = (
    "PRAGMA synchronous=NORMAL",  # safe with WAL, far fewer fsyncs
    "PRAGMA foreign_keys=ON",
)


def dump_json(value: Any) -> str:
    """A JSON column's text (every engine's `json_serializer`): orjson's, about seven times json.dumps's
    speed on a job's parameters, compact, and a float NaN or infinity as null (PostgreSQL's JSONB refuses
    json.dumps's `NaN`); json.dumps's for the rare value orjson refuses (an integer past 64 bits, a
    non-string key, a lone surrogate). Read back with json.loads either way (orjson would read an
    integer past 64 bits as a float)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(_finite(value))


def _finite(value: Any) -> Any:
    """`value` with every NaN and infinity as None, as orjson writes them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def make_engine(url: str, *, connect_args: dict[str, Any] | None = None) -> AsyncEngine:
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    in_file = sqlite_file(url)
    if in_file:
        Path(str(parsed.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # PostgreSQL: a pool big enough for a busy process, so connections are reused rather than
    # opened per request (the default 5 reopened ~1 in 4: benchmarks/RESULTS.md, section 7).
    # SQLite: one connection here. It has one writer anyway; more connections only contend for its
    # lock (busy waits) and each brings its own aiosqlite thread to hop to. The job's own transactions
    # take two more, `make_sqlite_thread_engine`'s; transactions here that write begin IMMEDIATE
    # (`Database.session(write=True)`). A memory database keeps SQLAlchemy's single-connection pool.
    pool: dict[str, Any] = {"pool_size": 20, "max_overflow": 20}
    if is_sqlite:
        pool = {"pool_size": 1, "max_overflow": 0} if in_file else {}
    engine = create_async_engine(
        url, connect_args=connect_args or {}, pool_pre_ping=not is_sqlite, json_serializer=dump_json, **pool
    )
    if is_sqlite:
        _configure_sqlite(engine.sync_engine)
    return engine


def sqlite_file(url: str) -> bool:
    """Whether `url` names a SQLite database in a file (not in memory: one such is per connection)."""
    parsed = make_url(url)
    name = str(parsed.database or "")
    return parsed.get_backend_name() == "sqlite" and name not in ("", ":memory:") and not name.startswith("file:")


def sqlite_path(url: str) -> Path | None:
    """The SQLite file `url` names (as its driver opens it), or None when it names no file."""
    return Path(os.path.abspath(str(make_url(url).database))) if sqlite_file(url) else None


def make_sqlite_thread_engine(url: str, *, waits: bool = True) -> Engine:
    """A blocking engine (the sqlite3 module) on the same SQLite file as `url`, with one connection and
    the same settings, for the job's transactions run whole (`Database`'s `SQLiteThread`). Each begins
    IMMEDIATE: the write lock is taken up front, so a transaction that reads, then writes, never fails
    because another connection wrote in between.

    `waits=False` is for transactions run on the event loop itself, which must never block on the
    disk or on another connection: no busy wait (when another connection holds the write lock, BEGIN
    fails at once, before any work, and the caller hands the transaction to the thread instead), and
    no WAL checkpoints (a checkpoint syncs files to disk; the thread does it)."""
    sync_url = make_url(url).set(drivername="sqlite")
    # Its one connection is opened, used and closed by one thread (the event loop's, or the SQLite
    # thread); check_same_thread only guards against a use from elsewhere, which that rules out.
    engine = create_engine(
        sync_url, pool_size=1, max_overflow=0, connect_args={"check_same_thread": False}, json_serializer=dump_json
    )
    _configure_sqlite(engine)
    if not waits:

        @event.listens_for(engine, "connect")
        def never_wait(dbapi_connection: Any, _record: Any) -> None:  # after _configure_sqlite's
            dbapi_connection.execute("PRAGMA busy_timeout=0")
            dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")

    return engine.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # sqlite3's legacy mode never BEGINs before DDL or SELECT, so a migration would not be one
        # transaction; switch that off and BEGIN ourselves (SQLAlchemy's documented recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(_SQLITE_BUSY_TIMEOUT_S * 1000)}")
        _switch_to_wal(cursor)
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(SQLITE_BEGIN_IMMEDIATE, False)
        # On a cursor of the driver's own: SQLAlchemy's execution path (a context, a result) for this
        # one fixed statement cost several times the statement, once per transaction.
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None, "a connection being begun is open"
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        finally:
            cursor.close()


def is_busy(error: sqlite3.Error) -> bool:
    """Whether SQLite refused because another connection holds the lock ("database is locked"):
    SQLITE_BUSY, or one of its extended codes (the low byte is the primary code)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


def _switch_to_wal(cursor: Any) -> None:
    """`PRAGMA journal_mode=WAL` (readers don't block the writer), waiting out a concurrent opener.

    On a new file (still in rollback mode) the switch reads the header, then writes it; when another
    process already holds the write lock, SQLite answers "database is locked" at once instead of calling
    the busy handler (it will not make a reader wait for a writer that may wait for it). So several
    processes starting on one new file retry here, for as long as busy_timeout would have waited.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if not is_busy(error) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
