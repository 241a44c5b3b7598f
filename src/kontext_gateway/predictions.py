"""Replicate-style predictions on the same jobs as the Images API: create, get, list, cancel.

A prediction's body is parsed into the same image request the Images API makes
(`protocol.prediction_call`). Input images are data URIs, this gateway's own file or image URLs (read
from the store), or outside http(s) URLs (fetched, refusing private addresses unless the operator
allows them). The prediction object is PredictionView's.
"""

from __future__ import annotations

from typing import Any

from .config import Settings
from .cursors import decode_cursor, encode_cursor
from .errors import invalid, not_found
from .jobs.webhooks import validate_webhook_url
from .keys import OPEN, Principal
from .prediction_view import PredictionView
from .protocol import PredictionCall
from .service import ImageService
from .store.db import Database
from .store.records import RequestRow


class PredictionService:
    def __init__(self, *, images: ImageService, db: Database, view: PredictionView, settings: Settings) -> None:
        self.images = images
        self.db = db
        self.view = view
        self.settings = settings

    async def create(
        self,
        prediction: PredictionCall,
        *,
        base_url: str,
        wait: float | None,
        principal: Principal = OPEN,
        request_id: str | None = None,
        provider: str | None = None,
    ) -> dict[str, Any]:
        """`provider`: the `x-provider` header, as on the Images API (one provider, no failover)."""
        if prediction.webhook is not None:
            await validate_webhook_url(prediction.webhook, self.settings)
        rid = await self.images.submit(
            prediction.call,
            base_url=base_url,
            principal=principal,
            provider=provider,
            webhook=prediction.webhook,
            webhook_events=prediction.webhook_events,
            request_id=request_id,
            waiter=bool(wait),
        )
        if wait:
            record: RequestRow | None = await self.images.wait(rid, timeout=wait, cancel_on_abandon=False)
        else:
            record = await self.db.get_request(rid)
        if record is None:
            raise not_found(f"No prediction '{rid}'.", code="prediction_not_found")
        return self.render(record, base_url)

    async def estimate(
        self, prediction: PredictionCall, *, base_url: str, principal: Principal = OPEN, provider: str | None = None
    ) -> dict[str, Any]:
        """`dryRun`: the prediction validated and priced, not created."""
        if prediction.webhook is not None:
            await validate_webhook_url(prediction.webhook, self.settings)
        return await self.images.estimate(prediction.call, base_url=base_url, principal=principal, provider=provider)

    async def get(
        self, rid: str, base_url: str, wait: float | None = None, principal: Principal = OPEN
    ) -> dict[str, Any]:
        await self._owned(rid, principal)
        if wait:
            await self.images.wait(rid, timeout=wait, cancel_on_abandon=False)
        record = await self.db.get_request(rid)
        if record is None:
            raise not_found(f"No prediction '{rid}'.", code="prediction_not_found")
        return self.render(record, base_url)

    async def cancel(self, rid: str, base_url: str, principal: Principal = OPEN) -> dict[str, Any]:
        await self._owned(rid, principal)
        record = await self.images.cancel(rid)
        if record is None:
            raise not_found(f"No prediction '{rid}'.", code="prediction_not_found")
        return self.render(record, base_url)

    async def _owned(self, rid: str, principal: Principal) -> None:
        """A key sees its own predictions (an admin key, every one): others' are not found, not forbidden."""
        if principal.sees_all():
            return
        if not principal.owns(await self.db.get_request(rid)):
            raise not_found(f"No prediction '{rid}'.", code="prediction_not_found")

    async def list(
        self, base_url: str, cursor: str | None, limit: int = 100, principal: Principal = OPEN
    ) -> dict[str, Any]:
        """Newest first, `limit` a page; `next` is the next page's URL."""
        before = None
        if cursor:
            before = decode_cursor(cursor)
            if before is None:
                raise invalid(
                    "Invalid 'cursor': use the 'next' URL of the previous page.", param="cursor", code="invalid_cursor"
                )
        key_id = None if principal.sees_all() else principal.key_id
        records = await self.db.list_requests(limit=limit + 1, before=before, key_id=key_id)
        page, more = records[:limit], len(records) > limit
        nxt = None
        if more:
            last = page[-1]
            nxt = f"{base_url.rstrip('/')}/v1/predictions?cursor={encode_cursor(last.created_at, last.id)}" + (
                f"&limit={limit}" if limit != 100 else ""
            )
        return {"previous": None, "next": nxt, "results": [self.render(r, base_url) for r in page]}

    def render(self, record: RequestRow, base_url: str) -> dict[str, Any]:
        return self.view.render(record, base_url)
