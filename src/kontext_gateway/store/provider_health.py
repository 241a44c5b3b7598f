"""Shared provider health in PostgreSQL: the `provider_health` table (migration 0007), a row per
provider config key, in a database the gateway has migrated (normally its own).

Each step is one statement, atomic on its own (row locks order concurrent writers: of two processes
asking for the half-open probe at once, the second sees the first's lease), judged by the database's
clock (now()). The store has its own small pool, in autocommit: a step is one round trip, and never
queues behind the jobs' statements (nor they behind it).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from ..config import POSTGRES_SCHEMES
from .records import HealthRow, HealthSnapshot, LatencyBatch

# The columns a step hands back: the row, as epoch seconds, and the database's clock.
_RETURNING = """extract(epoch FROM now())::float8 AS now, failures,
    extract(epoch FROM opened_at)::float8 AS opened_at, extract(epoch FROM probe_until)::float8 AS probe_until,
    latency_s"""

# One row even when the table is empty: the clock comes with the rows.
_SNAPSHOT = text(
    f"""SELECT h.key, {_RETURNING}
    FROM (SELECT 1) AS one LEFT JOIN provider_health AS h ON true"""
)

# Reopens (and drops the probe lease) at the threshold, or on the probe's own failure.
_REOPEN = "(h.failures + 1 >= :threshold OR h.probe_token = :probe)"
_FAILURE = text(
    f"""INSERT INTO provider_health AS h (key, failures, opened_at)
    VALUES (:key, 1, CASE WHEN :threshold <= 1 THEN now() END)
    ON CONFLICT (key) DO UPDATE SET
        failures = h.failures + 1,
        opened_at = CASE WHEN {_REOPEN} THEN now() ELSE h.opened_at END,
        probe_until = CASE WHEN {_REOPEN} THEN NULL ELSE h.probe_until END,
        probe_token = CASE WHEN {_REOPEN} THEN NULL ELSE h.probe_token END
    RETURNING {_RETURNING}"""
)

_SUCCESS = text(
    "UPDATE provider_health SET failures = 0, opened_at = NULL, probe_until = NULL, probe_token = NULL"
    " WHERE key = :key AND (failures <> 0 OR opened_at IS NOT NULL OR probe_token IS NOT NULL)"
)

_ACQUIRE = text(
    """UPDATE provider_health SET probe_until = now() + make_interval(secs => :lease), probe_token = :token
    WHERE key = :key AND opened_at <= now() - make_interval(secs => :reset)
        AND (probe_until IS NULL OR probe_until <= now())
    RETURNING key"""
)

_RELEASE = text(
    "UPDATE provider_health SET probe_until = NULL, probe_token = NULL WHERE key = :key AND probe_token = :token"
)

_LATENCY = text(
    """INSERT INTO provider_health AS h (key, failures, latency_s) VALUES (:key, 0, :first)
    ON CONFLICT (key) DO UPDATE SET
        latency_s = CASE WHEN h.latency_s IS NULL THEN :first ELSE :scale * h.latency_s + :offset END"""
)

_UNDEFINED_TABLE = "42P01"


class PostgresHealthStore:
    def __init__(self, url: str, *, timeout_s: float = 1.0) -> None:
        if not url.startswith(POSTGRES_SCHEMES):
            raise ValueError(f"not a PostgreSQL URL: {url!r}")
        self._engine = create_async_engine(
            "postgresql+asyncpg://" + url.split("://", 1)[1],
            pool_size=2,
            max_overflow=2,
            pool_timeout=timeout_s,
            isolation_level="AUTOCOMMIT",
            connect_args={"timeout": timeout_s, "command_timeout": timeout_s},
        )

    async def _rows(self, statement: Any, params: dict[str, Any] | list[dict[str, Any]]) -> list[Row[Any]]:
        try:
            async with self._engine.connect() as conn:
                result = await conn.execute(statement, params)
                return list(result.all()) if result.returns_rows else []
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) == _UNDEFINED_TABLE:
                raise RuntimeError(
                    "no provider_health table: the provider health URL must name a database the gateway "
                    "has migrated (normally its own DATABASE_URL)"
                ) from exc
            raise

    async def snapshot(self) -> HealthSnapshot:
        rows = await self._rows(_SNAPSHOT, {})
        return HealthSnapshot(rows[0].now, {r.key: _row(r) for r in rows if r.key is not None})

    async def failure(self, key: str, threshold: int, probe: str | None) -> HealthSnapshot:
        (row,) = await self._rows(_FAILURE, {"key": key, "threshold": threshold, "probe": probe})
        return HealthSnapshot(row.now, {key: _row(row)})

    async def success(self, key: str) -> None:
        await self._rows(_SUCCESS, {"key": key})

    async def acquire_probe(self, key: str, reset_s: float, lease_s: float, token: str) -> bool:
        params = {"key": key, "reset": float(reset_s), "lease": float(lease_s), "token": token}
        return bool(await self._rows(_ACQUIRE, params))

    async def release_probe(self, key: str, token: str) -> None:
        await self._rows(_RELEASE, {"key": key, "token": token})

    async def add_latency(self, batches: dict[str, LatencyBatch]) -> None:
        if batches:
            params = [{"key": k, "first": b.first, "scale": b.scale, "offset": b.offset} for k, b in batches.items()]
            await self._rows(_LATENCY, params)

    async def aclose(self) -> None:
        await self._engine.dispose()


def _row(r: Row[Any]) -> HealthRow:
    return HealthRow(failures=r.failures, opened_at=r.opened_at, probe_until=r.probe_until, latency_s=r.latency_s)
