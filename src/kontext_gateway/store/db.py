"""Request records: the `Database` repository over SQLite or PostgreSQL (SQLAlchemy async)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from kontext_gateway.store.engine import make_engine
from kontext_gateway.store.migrate import upgrade_to_head
from kontext_gateway.store.models import RequestRecord, utcnow

__all__ = ["Database", "RequestRecord"]

_COLUMNS = tuple(c.key for c in RequestRecord.__table__.columns)


def _as_dict(record: RequestRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in _COLUMNS}


class Database:
    """Owns the engine; every method is one short transaction, so no session outlives a call."""

    def __init__(self, url: str, *, connect_args: dict[str, Any] | None = None) -> None:
        # connect_args goes to the driver as is (e.g. asyncpg `server_settings` for a search_path).
        self.url = url
        self._connect_args = connect_args
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.start() has not been called")
        return self._engine

    async def start(self) -> None:
        if self._engine is not None:
            return
        engine = make_engine(self.url, connect_args=self._connect_args)
        try:
            await upgrade_to_head(engine)
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = self._sessions = None

    def _session(self) -> AsyncSession:
        if self._sessions is None:
            raise RuntimeError("Database.start() has not been called")
        return self._sessions()

    async def _update(self, id: str, **values: Any) -> None:
        async with self._session() as session, session.begin():
            result = await session.execute(update(RequestRecord).where(RequestRecord.id == id).values(**values))
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise KeyError(f"no request {id!r}")

    async def create_request(
        self,
        *,
        id: str,
        endpoint: str,
        model: str,
        mode: str,
        params: dict[str, Any],
        key_id: str | None = None,
    ) -> None:
        record = RequestRecord(
            id=id,
            created_at=utcnow(),
            key_id=key_id,
            endpoint=endpoint,
            model=model,
            mode=mode,
            params=params,
            status="queued",
            output_blob_ids=[],
            attempts=[],
        )
        async with self._session() as session, session.begin():
            session.add(record)

    async def mark_running(self, id: str, *, provider: str) -> None:
        await self._update(id, status="running", provider=provider, started_at=utcnow())

    async def mark_succeeded(
        self,
        id: str,
        *,
        provider: str,
        cost: float | None,
        currency: str,
        output_blob_ids: list[str],
        attempts: list[dict[str, Any]],
        output_size: str | None,
        output_format: str | None,
        duration_ms: int,
    ) -> None:
        await self._update(
            id,
            status="succeeded",
            completed_at=utcnow(),
            provider=provider,
            cost=cost,
            currency=currency,
            output_blob_ids=list(output_blob_ids),
            attempts=list(attempts),
            output_size=output_size,
            output_format=output_format,
            duration_ms=duration_ms,
            error=None,
        )

    async def mark_failed(
        self,
        id: str,
        *,
        error: dict[str, Any],
        attempts: list[dict[str, Any]],
        duration_ms: int,
        provider: str | None = None,
    ) -> None:
        values: dict[str, Any] = dict(
            status="failed", completed_at=utcnow(), error=error, attempts=list(attempts), duration_ms=duration_ms
        )
        if provider is not None:  # None keeps the provider mark_running recorded, if any
            values["provider"] = provider
        await self._update(id, **values)

    async def get_request(self, id: str) -> dict[str, Any] | None:
        async with self._session() as session:
            record = await session.get(RequestRecord, id)
            return None if record is None else _as_dict(record)

    async def list_requests(self, *, limit: int = 20) -> list[dict[str, Any]]:
        query = (
            select(RequestRecord)
            .order_by(RequestRecord.created_at.desc(), RequestRecord.id.desc())
            .limit(max(0, limit))
        )
        async with self._session() as session:
            return [_as_dict(r) for r in (await session.scalars(query)).all()]
