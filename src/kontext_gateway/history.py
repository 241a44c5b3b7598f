"""Request history and usage: list / show / purge past requests, and totals by key, model, provider and day.

Scoped to the caller: a key sees its own requests, an admin key or the open gateway every one. Purging
removes a request's payloads (prompt, input, images) and keeps its metadata (cost, status, timings,
attempts), so usage stays exact. The SQL is the store's (store/history.py); this module says what a
caller may ask and how the answers look.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from .catalog import Catalog
from .config import Settings
from .cursors import decode_cursor, encode_cursor
from .errors import GatewayError, invalid, not_found
from .keys import OPEN, Principal
from .links import OwnLinks
from .store.blobs import BlobStore
from .store.db import Database
from .store.history import GROUPS, HistoryRows, RequestFilter
from .store.models import utcnow
from .store.records import RUNNING, JobStatus, RequestRow
from .timing import iso

MAX_LIMIT = 100
SETTINGS = (
    "seed",
    "n",
    "size",
    "aspect_ratio",
    "resolution",
    "output_format",
    "output_compression",
    "cfg_scale",
    "num_inference_steps",
    "extra",
)
_UNIX = re.compile(r"-?\d+(\.\d+)?")


class History:
    def __init__(
        self,
        *,
        rows: HistoryRows,
        db: Database,
        blobs: BlobStore,
        catalog: Catalog,
        links: OwnLinks,
        settings: Settings,
    ) -> None:
        self.rows = rows
        self.db = db
        self.blobs = blobs
        self.catalog = catalog
        self.links = links
        self.settings = settings

    # -- list / get / purge ---------------------------------------------------------------------------

    async def page(
        self,
        principal: Principal,
        base_url: str,
        *,
        key_id: str | None = None,
        model: str | None = None,
        provider: str | None = None,
        status: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """Newest first, keyset-paginated on (created_at, id): a page never repeats or skips a row,
        however many requests arrive while the caller walks the pages."""
        if not 1 <= limit <= MAX_LIMIT:
            raise invalid(f"'limit' must be between 1 and {MAX_LIMIT}.", param="limit", code="integer_out_of_range")
        statuses = None
        if status:
            wanted = [s.strip() for s in status.split(",") if s.strip()]
            known = [s.value for s in JobStatus]
            if unknown := [s for s in wanted if s not in known]:
                raise invalid(f"Unknown status '{unknown[0]}'; one of {', '.join(known)}.", param="status")
            statuses = tuple(JobStatus(s) for s in wanted)
        where = self._filter(
            principal,
            key_id,
            model,
            provider,
            statuses=statuses,
            created_after=parse_time(created_after, "created_after") if created_after else None,
            created_before=parse_time(created_before, "created_before") if created_before else None,
        )
        before = None
        if cursor:
            before = decode_cursor(cursor)
            if before is None:
                raise invalid(
                    "Invalid 'cursor': pass back the 'next_cursor' of the previous page.",
                    param="cursor",
                    code="invalid_cursor",
                )
        rows = await self.rows.page(where, limit=limit + 1, before=before)
        page, more = rows[:limit], len(rows) > limit
        return {
            "object": "list",
            "data": [self.render(r, base_url) for r in page],
            "has_more": more,
            "next_cursor": encode_cursor(page[-1].created_at, page[-1].id) if more else None,
        }

    async def get(self, rid: str, principal: Principal, base_url: str) -> dict[str, Any]:
        """One request with its ledger entry (estimate, actual cost, line items) and logs."""
        record = await self._visible(rid, principal)
        entry = await self.rows.ledger(rid)
        item = self.render(record, base_url)
        item["ledger"] = (
            None
            if entry is None
            else {
                "state": entry.state,
                "estimate_micros": entry.estimate_micros,
                "actual_micros": entry.actual_micros,
                "lines": entry.lines,
                "created_at": iso(entry.created_at),
                "settled_at": iso(entry.settled_at),
            }
        )
        item["logs"] = record.logs or ""
        return item

    async def purge(self, rid: str, principal: Principal, base_url: str) -> dict[str, Any]:
        """Remove one finished request's payloads (a second purge changes nothing); 409 while it runs."""
        record = await self._visible(rid, principal)
        if record.status in RUNNING:
            raise GatewayError(
                f"Request '{rid}' is still {record.status}; its payloads can be purged once it "
                "has ended (cancel it first to stop it).",
                status=409,
                code="request_running",
            )
        await self.purge_payloads([rid])
        return await self.get(rid, principal, base_url)

    async def purge_payloads(self, ids: list[str]) -> list[str]:
        """Purge finished requests' payloads; returns the ids purged now (running or purged ones are
        skipped). After the store's transaction commits, each image blob is deleted from the blob store
        unless a request, an upstream task or an uploaded file still names it: blobs are
        content-addressed, so identical images share one blob. Committing first means a failure never
        leaves a record pointing at a deleted blob (at worst a blob is left over). Known gap: a new
        request storing the very same bytes in the instant between the reference check and the delete
        would lose that blob (the local store's `put` skips writing a file that exists)."""
        if not ids:
            return []
        purged = await self.rows.purge(ids, utcnow())
        if not purged.request_ids:
            return []
        unused = purged.blob_ids - await self.rows.referenced_blobs(purged.blob_ids)
        await self.blobs.delete(*sorted(unused))  # malformed ids and blobs already gone are skipped
        return purged.request_ids

    async def _visible(self, rid: str, principal: Principal) -> RequestRow:
        """Another key's request is not found, not forbidden: its existence is not disclosed."""
        record = await self.db.get_request(rid)
        if record is None or not principal.owns(record):
            raise not_found(f"No request '{rid}'.", param="id", code="request_not_found")
        return record

    def render(self, record: RequestRow, base_url: str) -> dict[str, Any]:
        params = record.params or {}
        created, started, completed = record.created_at, record.started_at, record.completed_at
        purged = record.purged_at is not None
        # What the client was told: not the status and headers kept to replay it.
        error = {k: v for k, v in record.error.items() if k not in ("status", "headers")} if record.error else None
        show_prompt = not purged and self.settings.payload_retention != "metadata"
        outputs = (record.output_blob_ids or []) if record.status == JobStatus.SUCCEEDED and not purged else []
        return {
            "id": record.id,
            "object": "request",
            "endpoint": record.endpoint,
            "model": record.model,
            "provider": record.provider,
            "key_id": record.key_id,
            "status": record.status,
            "created_at": iso(created),
            "started_at": iso(started),
            "completed_at": iso(completed),
            "duration_ms": record.duration_ms,
            "queue_ms": None if started is None else max(0, int((started - created).total_seconds() * 1000)),
            "cost": record.cost,
            "currency": record.currency or "USD",
            "n": params.get("n"),
            "size": record.output_size or params.get("size"),
            "output_format": record.output_format or params.get("output_format"),
            "attempts": record.attempts or [],
            "error": error,
            "output": [self.links.blob_url(base_url, b) for b in outputs],
            "prompt": params.get("prompt") if show_prompt else None,
            "purged": purged,
            "mode": record.mode,
            # What reproduces it (the playground's "reuse settings"): the parameters as normalised.
            "settings": {k: params[k] for k in SETTINGS if params.get(k) is not None},
            "inputs": len(params.get("input_blob_ids") or []),
        }

    async def model_stats(self, model_id: str, days: float = 7.0, sample: int = 2000) -> dict[str, Any]:
        """Per provider of a model, what this gateway observed over the last `days` (its newest
        `sample` requests): attempts, success rate and the latency of successful attempts (p50, p95).
        Every catalog provider is listed, with nulls where nothing was observed."""
        model = self.catalog.get(model_id)
        rows = await self.rows.attempts(model.id, utcnow() - timedelta(days=days), sample)
        seen: dict[str, dict[str, Any]] = {}
        for attempts in rows:
            for a in attempts:
                if a.get("outcome") == "skipped":
                    continue
                s = seen.setdefault(a["config_key"], {"succeeded": 0, "failed": 0, "latencies": []})
                if a.get("outcome") == "succeeded":
                    s["succeeded"] += 1
                    s["latencies"].append(a.get("duration_ms") or 0)
                else:
                    s["failed"] += 1
        providers = []
        for entry in model.providers:
            s = seen.get(entry.config_key, {"succeeded": 0, "failed": 0, "latencies": []})
            total = s["succeeded"] + s["failed"]
            lat = sorted(s["latencies"])
            providers.append(
                {
                    "config_key": entry.config_key,
                    "provider": entry.provider,
                    "attempts": total,
                    "succeeded": s["succeeded"],
                    "failed": s["failed"],
                    "success_rate": round(s["succeeded"] / total, 4) if total else None,
                    "latency_ms": {"p50": _pct(lat, 0.50), "p95": _pct(lat, 0.95)} if lat else None,
                    "price_per_image": entry.pricing.price_per_image(),
                    "currency": entry.pricing.currency,
                }
            )
        return {
            "object": "model_stats",
            "model": model.id,
            "window_days": days,
            "requests": len(rows),
            "providers": providers,
        }

    def _filter(
        self,
        principal: Principal,
        key_id: str | None,
        model: str | None,
        provider: str | None,
        *,
        statuses: tuple[JobStatus, ...] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> RequestFilter:
        """What the list and the usage look at: a normal key is always narrowed to its own requests
        (asking for another key's then finds nothing, rather than an error that would confirm it exists)."""
        return RequestFilter(
            owner=None if principal.sees_all() else principal.key_id,
            key_id=key_id or None,
            model=self._model_id(model) if model else None,
            provider=provider or None,
            statuses=statuses,
            created_after=created_after,
            created_before=created_before,
        )

    def _model_id(self, name: str) -> str:
        """An alias as its catalog id; a name the catalog no longer knows as given (old history)."""
        try:
            return self.catalog.resolve(name)[0].id
        except GatewayError:
            return name

    # -- usage ----------------------------------------------------------------------------------------

    async def usage(
        self,
        principal: Principal = OPEN,
        *,
        key_id: str | None = None,
        model: str | None = None,
        provider: str | None = None,
        start: str | date | None = None,
        end: str | date | None = None,
        group_by: str | Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Totals per (UTC day of creation, key, model, provider), grouped in SQL; `start` and `end`
        are dates, both included."""
        groups = _groups(group_by)
        where = self._filter(
            principal,
            key_id,
            model,
            provider,
            created_after=_midnight(parse_date(start, "start")) if start is not None else None,
            created_before=_midnight(parse_date(end, "end")) + timedelta(days=1) if end is not None else None,
        )
        data = []
        for row in await self.rows.usage(where, groups):
            item: dict[str, Any] = {"day": None, "key_id": None, "key_name": None, "model": None, "provider": None}
            item.update(row)
            item["cost_usd"] = item["cost_micros"] / 1_000_000
            data.append(item)
        data.sort(key=lambda i: tuple((i[k] is not None, i[k] or "") for k in ("day", "key_id", "model", "provider")))
        totals = {"requests": 0, "succeeded": 0, "failed": 0, "images": 0, "cost_micros": 0}
        for item in data:
            for name in totals:
                totals[name] += item[name]
        return {
            "object": "usage",
            "group_by": list(groups),
            "data": data,
            "totals": {**totals, "cost_usd": totals["cost_micros"] / 1_000_000},
        }


# -- parsing and small helpers -------------------------------------------------------------------------


def parse_time(value: str, param: str) -> datetime:
    """ISO 8601 (a date alone is its midnight; no zone means UTC) or unix seconds."""
    text = re.sub(r" (\d\d:?\d\d)$", r"+\1", value.strip())  # a '+' that arrived unescaped in a query string
    try:
        at = datetime.fromtimestamp(float(text), UTC) if _UNIX.fullmatch(text) else datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        raise invalid(
            f"'{param}' must be an ISO 8601 time (e.g. 2026-11-21T10:00:00Z) or unix seconds.",
            param=param,
            code="invalid_value",
        ) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def parse_date(value: str | date, param: str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise invalid(f"'{param}' must be a date, YYYY-MM-DD (UTC).", param=param, code="invalid_value") from None


def _groups(group_by: str | Iterable[str] | None) -> tuple[str, ...]:
    if group_by is None:
        return GROUPS
    wanted = [g.strip() for g in (group_by.split(",") if isinstance(group_by, str) else group_by) if g.strip()]
    if unknown := [g for g in wanted if g not in GROUPS]:
        raise invalid(f"Unknown group_by '{unknown[0]}'; a comma list of {', '.join(GROUPS)}.", param="group_by")
    return tuple(g for g in GROUPS if g in wanted)


def _pct(values: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values."""
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
