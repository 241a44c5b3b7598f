"""Schema migrations, run in-process at start-up: alembic to head, one migrator at a time."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kontext_gateway.store.engine import SQLITE_BEGIN_IMMEDIATE

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Any fixed 64-bit number works, as long as nothing else in the database uses it as an advisory lock.
_PG_LOCK_KEY = 0x6B6F6E74657874  # "kontext"


# alembic keeps the running migration in module globals (`alembic.context`), so two upgrades interleaving
# on one event loop (two Database objects, even on different databases) would trample each other.
_loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _in_process_lock() -> asyncio.Lock:
    return _loop_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    # configparser interpolates '%', so a path containing one must be escaped.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    return cfg


@asynccontextmanager
async def migration_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction holding the migration lock, so that two processes starting at once don't race.

    PostgreSQL: a transaction-scoped advisory lock, released by the commit. SQLite: BEGIN IMMEDIATE
    takes the database write lock at once; the other process waits on busy_timeout.
    """
    async with engine.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        yield conn


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


async def upgrade_to_head(engine: AsyncEngine) -> None:
    # The locks are taken before alembic reads alembic_version, so the second migrator sees the first's work.
    async with _in_process_lock(), migration_transaction(engine) as conn:
        await conn.run_sync(_upgrade)


_heads: tuple[str, ...] | None = None


def code_heads() -> tuple[str, ...]:
    """The revisions this code's migrations end at (read once: the files do not change at run time)."""
    global _heads
    if _heads is None:
        _heads = tuple(sorted(ScriptDirectory.from_config(alembic_config()).get_heads()))
    return _heads


async def database_heads(engine: AsyncEngine) -> tuple[str, ...]:
    """The revisions the database says it is at (empty for a database never migrated)."""

    def read(connection: Connection) -> tuple[str, ...]:
        return tuple(sorted(MigrationContext.configure(connection).get_current_heads()))

    async with engine.connect() as conn:
        return await conn.run_sync(read)
