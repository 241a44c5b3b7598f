"""API key rows: insert, change, revoke, read. The rules (what a valid limit is, how a key is shown)
are keys.py's; this is only where its SQL lives."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from .db import Database
from .models import ApiKey, utcnow
from .records import KeyRow


class KeyRows:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, *, id: str, name: str, hash: str, hint: str, admin: bool, limits: dict[str, Any]) -> KeyRow:
        row = ApiKey(
            id=id,
            name=name,
            hash=hash,
            hint=hint,
            admin=admin,
            created_at=utcnow(),
            spent_micros=0,
            reserved_micros=0,
            total_spent_micros=0,
            **limits,
        )
        async with self.db.session(write=True) as session, session.begin():
            session.add(row)
        return KeyRow.from_row(row)

    async def update(self, key_id: str, values: dict[str, Any]) -> KeyRow | None:
        """Set `values` (column -> value) on the key; None when there is no such key."""
        async with self.db.session(write=True) as session, session.begin():
            if values:
                await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(**values))
            row = await session.get(ApiKey, key_id)
            return None if row is None else KeyRow.from_row(row)

    async def revoke(self, key_id: str, at: datetime) -> KeyRow | None:
        """Revoked at `at`, unless it already was (its first revocation stays); None: no such key."""
        async with self.db.session(write=True) as session, session.begin():
            await session.execute(
                update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=at)
            )
            row = await session.get(ApiKey, key_id)
            return None if row is None else KeyRow.from_row(row)

    async def get(self, key_id: str) -> KeyRow | None:
        async with self.db.session() as session:
            row = await session.get(ApiKey, key_id)
            return None if row is None else KeyRow.from_row(row)

    async def list(self, *, include_revoked: bool = True) -> list[KeyRow]:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        async with self.db.session() as session:
            return [KeyRow.from_row(r) for r in (await session.scalars(query)).all()]

    async def by_hash(self, key_hash: str) -> KeyRow | None:
        async with self.db.session() as session:
            row = (await session.execute(select(ApiKey).where(ApiKey.hash == key_hash))).scalar_one_or_none()
            return None if row is None else KeyRow.from_row(row)

    async def any(self) -> bool:
        async with self.db.session() as session:
            return (await session.execute(select(ApiKey.id).limit(1))).first() is not None
