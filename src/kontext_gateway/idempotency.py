"""`Idempotency-Key` on every POST that creates work: a retried request joins the original job.

Same key, same request: the same job (prediction or image request) and the same response, no second
upstream call, no second charge. Same key, another request: 422. The fingerprint is taken over the
parsed request (fields and the SHA-256 of each file), not the raw bytes: an SDK retry of a multipart
request sends a new boundary. Keys are scoped to the API key (or to the open gateway) and kept
`idempotency_ttl_s` (24 h by default); an expired key starts afresh.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from .errors import GatewayError
from .store.db import Database
from .store.models import IdempotencyKey, utcnow

HEADER = "idempotency-key"
MAX_KEY = 255


def fingerprint(path: str, fields: dict[str, Any], files: list[bytes] = ()) -> str:  # type: ignore[assignment]
    canonical = json.dumps(
        {"path": path, "fields": fields, "files": [hashlib.sha256(f).hexdigest() for f in files]},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Idempotency:
    def __init__(self, db: Database, ttl_s: float) -> None:
        self.db = db
        self.ttl = timedelta(seconds=ttl_s)

    async def claim(self, scope: str, key: str, fp: str, request_id: str) -> str | None:
        """Bind `key` to `request_id`. Returns None when the key is new (go ahead and create), or the
        id of the job it already names (join it). Raises 422 when it names a different request."""
        if not key or len(key) > MAX_KEY:
            raise GatewayError(
                f"Idempotency-Key must be 1 to {MAX_KEY} characters.",
                status=400,
                param="Idempotency-Key",
                code="invalid_idempotency_key",
            )
        now = utcnow()
        for _ in range(2):
            try:
                async with self.db._session() as session, session.begin():
                    session.add(
                        IdempotencyKey(scope=scope, key=key, fingerprint=fp, request_id=request_id, created_at=now)
                    )
                return None
            except IntegrityError:
                pass
            async with self.db._session() as session, session.begin():
                row = (
                    await session.execute(
                        select(IdempotencyKey).where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
                    )
                ).scalar_one_or_none()
                if row is None:
                    continue  # deleted in between: try to insert again
                if row.created_at < now - self.ttl:
                    await session.execute(
                        delete(IdempotencyKey).where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
                    )
                    continue  # expired: this request starts afresh under the key
                if row.fingerprint != fp:
                    raise GatewayError(
                        "This Idempotency-Key was used for a different request. Use a new key for a new request.",
                        status=422,
                        param="Idempotency-Key",
                        code="idempotency_key_reused",
                    )
                return row.request_id
        raise GatewayError(
            "Could not claim the Idempotency-Key; retry.",
            status=409,
            code="idempotency_conflict",
            headers={"retry-after": "1"},
        )
