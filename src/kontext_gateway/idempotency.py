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
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .errors import GatewayError
from .store.idempotency import IdempotencyKeys
from .store.models import utcnow

HEADER = "idempotency-key"
MAX_KEY = 255


def fingerprint(path: str, fields: dict[str, Any], files: Sequence[bytes] = ()) -> str:
    canonical = json.dumps(
        {"path": path, "fields": fields, "files": [hashlib.sha256(f).hexdigest() for f in files]},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Idempotency:
    def __init__(self, keys: IdempotencyKeys, ttl_s: float) -> None:
        self.keys = keys
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
            if await self.keys.insert(scope, key, fp, request_id, now):
                return None
            current = await self.keys.current(scope, key, made_after=now - self.ttl)
            if current is None:
                continue  # deleted in between, or expired: bind it afresh
            if current.fingerprint != fp:
                raise GatewayError(
                    "This Idempotency-Key was used for a different request. Use a new key for a new request.",
                    status=422,
                    param="Idempotency-Key",
                    code="idempotency_key_reused",
                )
            return current.request_id
        raise GatewayError(
            "Could not claim the Idempotency-Key; retry.",
            status=409,
            code="idempotency_conflict",
            headers={"retry-after": "1"},
        )
