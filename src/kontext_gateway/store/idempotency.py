"""Idempotency keys: which request a client's key names (the rules are in idempotency.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from .db import Database
from .models import IdempotencyKey


@dataclass(frozen=True, slots=True)
class Claimed:
    fingerprint: str
    request_id: str


class IdempotencyKeys:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, scope: str, key: str, fingerprint: str, request_id: str, at: datetime) -> bool:
        """Bind the key; False when it is bound already (by this request's twin, or an older one)."""
        try:
            async with self.db.session(write=True) as session, session.begin():
                session.add(
                    IdempotencyKey(scope=scope, key=key, fingerprint=fingerprint, request_id=request_id, created_at=at)
                )
        except IntegrityError:
            return False
        return True

    async def current(self, scope: str, key: str, *, made_after: datetime) -> Claimed | None:
        """What the key names now; None when nothing, or only a binding made before `made_after`
        (expired: removed in the same transaction, so the key can be bound afresh)."""
        where = (IdempotencyKey.scope == scope, IdempotencyKey.key == key)
        async with self.db.session(write=True) as session, session.begin():
            row = (await session.execute(select(IdempotencyKey).where(*where))).scalar_one_or_none()
            if row is None:
                return None
            if row.created_at < made_after:
                await session.execute(delete(IdempotencyKey).where(*where))
                return None
            return Claimed(row.fingerprint, row.request_id)
