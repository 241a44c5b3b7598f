"""Request history and usage: list / show / purge past requests, and totals by key, model, provider and day.

Reads the `requests` table directly (and the ledger for one request), scoped to the caller: a key sees
its own requests, an admin key or the open gateway every one. Purging removes a request's payloads
(prompt, input, images) and keeps its metadata (cost, status, timings, attempts), so usage stays exact.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Text, and_, case, cast, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from .errors import GatewayError, invalid, not_found
from .keys import OPEN, Principal
from .predictions import _decode_cursor, _encode_cursor
from .store.models import ApiKey, FileRecord, LedgerEntry, RequestRecord, UpstreamTask, WebhookDelivery, utcnow

if TYPE_CHECKING:
    from .gateway import Gateway

STATUSES = ("starting", "processing", "succeeded", "failed", "canceled")
RUNNING = ("starting", "processing")
ENDED = ("succeeded", "failed", "canceled")
GROUPS = ("day", "key", "model", "provider")
OPEN_DELIVERY = ("pending", "sending")  # still to be sent: their payload is left alone
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
    """The history and usage queries for one gateway (cheap to build: it holds no state)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    # -- list / get / purge ---------------------------------------------------------------------------

    async def list(
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
        where = self._scope(principal, key_id, model, provider)
        if status:
            wanted = [s.strip() for s in status.split(",") if s.strip()]
            if unknown := [s for s in wanted if s not in STATUSES]:
                raise invalid(f"Unknown status '{unknown[0]}'; one of {', '.join(STATUSES)}.", param="status")
            where.append(RequestRecord.status.in_(wanted))
        if created_after:
            where.append(RequestRecord.created_at >= parse_time(created_after, "created_after"))
        if created_before:
            where.append(RequestRecord.created_at < parse_time(created_before, "created_before"))
        if cursor:
            try:
                at, rid = _decode_cursor(cursor)
            except GatewayError:
                raise invalid(
                    "Invalid 'cursor': pass back the 'next_cursor' of the previous page.",
                    param="cursor",
                    code="invalid_cursor",
                ) from None
            where.append(
                or_(RequestRecord.created_at < at, and_(RequestRecord.created_at == at, RequestRecord.id < rid))
            )
        query = (
            select(RequestRecord)
            .where(*where)
            .order_by(RequestRecord.created_at.desc(), RequestRecord.id.desc())
            .limit(limit + 1)
        )
        async with self.gw.db._session() as session:
            rows = [_record(r) for r in (await session.scalars(query)).all()]
        page, more = rows[:limit], len(rows) > limit
        return {
            "object": "list",
            "data": [self.render(r, base_url) for r in page],
            "has_more": more,
            "next_cursor": _encode_cursor(page[-1]["created_at"], page[-1]["id"]) if more else None,
        }

    async def get(self, rid: str, principal: Principal, base_url: str) -> dict[str, Any]:
        """One request with its ledger entry (estimate, actual cost, line items) and logs."""
        record = await self._visible(rid, principal)
        async with self.gw.db._session() as session:
            entry = await session.get(LedgerEntry, rid)
        item = self.render(record, base_url)
        item["ledger"] = (
            None
            if entry is None
            else {
                "state": entry.state,
                "estimate_micros": entry.estimate_micros,
                "actual_micros": entry.actual_micros,
                "lines": entry.lines,
                "created_at": _iso(entry.created_at),
                "settled_at": _iso(entry.settled_at),
            }
        )
        item["logs"] = record.get("logs") or ""
        return item

    async def purge(self, rid: str, principal: Principal, base_url: str) -> dict[str, Any]:
        """Remove one finished request's payloads (a second purge changes nothing); 409 while it runs."""
        record = await self._visible(rid, principal)
        if record["status"] in RUNNING:
            raise GatewayError(
                f"Request '{rid}' is still {record['status']}; its payloads can be purged once it "
                "has ended (cancel it first to stop it).",
                status=409,
                code="request_running",
            )
        await purge_payloads(self.gw, [rid])
        return await self.get(rid, principal, base_url)

    async def _visible(self, rid: str, principal: Principal) -> dict[str, Any]:
        """Another key's request is not found, not forbidden: its existence is not disclosed."""
        record = await self.gw.db.get_request(rid)
        if record is None or not principal.owns(record):
            raise not_found(f"No request '{rid}'.", param="id", code="request_not_found")
        return record

    def render(self, record: dict[str, Any], base_url: str) -> dict[str, Any]:
        params = record.get("params") or {}
        created, started, completed = record["created_at"], record.get("started_at"), record.get("completed_at")
        purged = record.get("purged_at") is not None
        error = record.get("error")
        if isinstance(error, dict):  # what the client was told: not the status and headers kept to replay it
            error = {k: v for k, v in error.items() if k not in ("status", "headers")}
        show_prompt = not purged and self.gw.settings.payload_retention != "metadata"
        outputs = (record.get("output_blob_ids") or []) if record["status"] == "succeeded" and not purged else []
        return {
            "id": record["id"],
            "object": "request",
            "endpoint": record.get("endpoint"),
            "model": record["model"],
            "provider": record.get("provider"),
            "key_id": record.get("key_id"),
            "status": record["status"],
            "created_at": _iso(created),
            "started_at": _iso(started),
            "completed_at": _iso(completed),
            "duration_ms": record.get("duration_ms"),
            "queue_ms": None if started is None else max(0, int((started - created).total_seconds() * 1000)),
            "cost": record.get("cost"),
            "currency": record.get("currency") or "USD",
            "n": params.get("n"),
            "size": record.get("output_size") or params.get("size"),
            "output_format": record.get("output_format") or params.get("output_format"),
            "attempts": record.get("attempts") or [],
            "error": error,
            "output": [self.gw.images.blob_url(base_url, b) for b in outputs],
            "prompt": params.get("prompt") if show_prompt else None,
            "purged": purged,
            "mode": record.get("mode"),
            # What reproduces it (the playground's "reuse settings"): the parameters as normalised.
            "settings": {k: params[k] for k in SETTINGS if params.get(k) is not None},
            "inputs": len(params.get("input_blob_ids") or []),
        }

    async def model_stats(self, model_id: str, days: float = 7.0, sample: int = 2000) -> dict[str, Any]:
        """Per provider of a model, what this gateway observed over the last `days` (its newest
        `sample` requests): attempts, success rate and the latency of successful attempts (p50, p95).
        Every catalog provider is listed, with nulls where nothing was observed."""
        model = self.gw.catalog.get(model_id)
        since = utcnow() - timedelta(days=days)
        query = (
            select(RequestRecord.attempts)
            .where(RequestRecord.model == model.id, RequestRecord.created_at >= since)
            .order_by(RequestRecord.created_at.desc())
            .limit(sample)
        )
        async with self.gw.db._session() as session:
            rows = (await session.execute(query)).scalars().all()
        seen: dict[str, dict[str, Any]] = {}
        for attempts in rows:
            for a in attempts or []:
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

    def _scope(
        self, principal: Principal, key_id: str | None, model: str | None, provider: str | None
    ) -> list[ColumnElement[bool]]:
        """Filters shared by the list and usage: a normal key is always narrowed to its own requests
        (asking for another key's then finds nothing, rather than an error that would confirm it exists)."""
        where: list[ColumnElement[bool]] = []
        if not principal.sees_all():
            where.append(RequestRecord.key_id == principal.key_id)
        if key_id:
            where.append(RequestRecord.key_id == key_id)
        if model:
            where.append(RequestRecord.model == self._model_id(model))
        if provider:
            # A provider name ("fal") matches each of its config keys ("fal/flux.1-kontext-pro").
            where.append(
                RequestRecord.provider == provider
                if "/" in provider
                else or_(
                    RequestRecord.provider == provider,
                    RequestRecord.provider.startswith(provider + "/", autoescape=True),
                )
            )
        return where

    def _model_id(self, name: str) -> str:
        """An alias as its catalog id; a name the catalog no longer knows as given (old history)."""
        try:
            return self.gw.catalog.resolve(name)[0].id
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
        where = self._scope(principal, key_id, model, provider)
        if start is not None:
            where.append(RequestRecord.created_at >= _midnight(parse_date(start, "start")))
        if end is not None:
            where.append(RequestRecord.created_at < _midnight(parse_date(end, "end")) + timedelta(days=1))
        columns: dict[str, Any] = {}
        if "day" in groups:
            columns["day"] = self._day(RequestRecord.created_at)
        if "key" in groups:
            columns.update(key_id=RequestRecord.key_id, key_name=ApiKey.name)
        if "model" in groups:
            columns["model"] = RequestRecord.model
        if "provider" in groups:
            columns["provider"] = RequestRecord.provider
        succeeded = RequestRecord.status == "succeeded"
        # Money: each request's `cost` (the settled ledger amount in USD, micros / 1e6) turned back into
        # integer micros per row and summed as integers, so totals are exact and equal the sum of the
        # costs the history shows. `requests.cost` rather than a join on ledger.actual_micros: same
        # numbers, no join, and it also covers rejected requests (no ledger row, no cost).
        cost_micros = func.sum(cast(func.round(func.coalesce(RequestRecord.cost, 0) * 1_000_000), BigInteger))
        # Images: a succeeded request delivered its `n` (the router returns all n or fails), and `n`
        # survives a purge, which empties output_blob_ids.
        images = func.sum(case((succeeded, RequestRecord.params["n"].as_integer()), else_=0))
        query = select(
            *(c.label(name) for name, c in columns.items()),
            func.count().label("requests"),
            func.sum(case((succeeded, 1), else_=0)).label("succeeded"),
            func.sum(case((RequestRecord.status == "failed", 1), else_=0)).label("failed"),
            images.label("images"),
            cost_micros.label("cost_micros"),
        ).where(*where)
        if "key" in groups:
            query = query.outerjoin(ApiKey, ApiKey.id == RequestRecord.key_id)
        if columns:
            query = query.group_by(*columns.values())
        async with self.gw.db._session() as session:
            rows = (await session.execute(query)).mappings().all()
        data = []
        for row in rows:
            if not row["requests"]:
                continue  # no grouping and nothing matched: one all-NULL row
            item: dict[str, Any] = {"day": None, "key_id": None, "key_name": None, "model": None, "provider": None}
            item.update({name: row[name] for name in columns})
            if item["day"] is not None:
                item["day"] = str(item["day"])[:10]  # a date on PostgreSQL, text on SQLite
            item.update(_counts(row))
            data.append(item)
        data.sort(key=lambda i: tuple((i[k] is not None, i[k] or "") for k in ("day", "key_id", "model", "provider")))
        totals = {"requests": 0, "succeeded": 0, "failed": 0, "images": 0, "cost_micros": 0}
        for item in data:
            for name in totals:
                totals[name] += item[name]
        totals["cost_usd"] = totals["cost_micros"] / 1_000_000
        return {"object": "usage", "group_by": list(groups), "data": data, "totals": totals}

    def _day(self, column: Any) -> Any:
        """The UTC calendar day of a timestamp: SQLite keeps UTC text; PostgreSQL's date() would use
        the session's time zone, so the timestamp is first taken to UTC."""
        if self.gw.db.engine.dialect.name == "postgresql":
            return func.date(func.timezone("UTC", column))
        return func.date(column)


# -- purging ------------------------------------------------------------------------------------------


async def purge_payloads(gw: Gateway, ids: list[str]) -> list[str]:
    """Purge finished requests' payloads; returns the ids purged now (running or purged ones are skipped).

    In one transaction: the prompt (params.prompt) and `input` become null, the image ids are emptied
    (outputs, inputs, the upstream tasks' outputs), closed webhook deliveries lose their payload, and
    `purged_at` is set. After the commit, each image file is deleted unless a request, an upstream task
    or an uploaded file still names it: blobs are content-addressed, so identical images share one file.
    Committing first means a failure never leaves a record pointing at a deleted file (at worst a file
    is left over). Known gap: a new request storing the very same bytes in the instant between the
    reference check and the delete would lose that file (`put` skips writing a file that exists)."""
    if not ids:
        return []
    now, blobs, purged = utcnow(), set(), []
    async with gw.db._session() as session, session.begin():
        query = (
            select(RequestRecord)
            .where(RequestRecord.id.in_(ids), RequestRecord.status.in_(ENDED), RequestRecord.purged_at.is_(None))
            .with_for_update()
        )
        for record in (await session.scalars(query)).all():
            params = dict(record.params or {})
            blobs.update(record.output_blob_ids or [], params.get("input_blob_ids") or [])
            params.update(prompt=None, input_blob_ids=[])
            record.params, record.input, record.output_blob_ids, record.purged_at = params, None, [], now
            purged.append(record.id)
        if not purged:
            return []
        tasks = select(UpstreamTask).where(UpstreamTask.request_id.in_(purged))
        for task in (await session.scalars(tasks)).all():
            blobs.update(task.output_blob_ids or [])
            task.output_blob_ids = []
        deliveries = select(WebhookDelivery).where(
            WebhookDelivery.request_id.in_(purged), WebhookDelivery.state.not_in(OPEN_DELIVERY)
        )
        for delivery in (await session.scalars(deliveries)).all():
            delivery.payload = {"id": delivery.request_id, "data_removed": True}
    unused = blobs - await referenced_blobs(gw, blobs)
    await asyncio.to_thread(_delete_files, gw, unused)
    return purged


async def referenced_blobs(gw: Gateway, blob_ids: set[str], chunk: int = 50) -> set[str]:
    """Which of `blob_ids` something still names. The JSON lists are searched as text (one scan per
    chunk, the same SQL on SQLite and PostgreSQL; ids are hex, safe in LIKE), then confirmed exactly."""
    found: set[str] = set()
    ids = sorted(blob_ids)
    async with gw.db._session() as session:
        for i in range(0, len(ids), chunk):
            part = ids[i : i + chunk]
            outs, params = cast(RequestRecord.output_blob_ids, Text), cast(RequestRecord.params, Text)
            rows = await session.execute(
                select(RequestRecord.output_blob_ids, RequestRecord.params).where(
                    RequestRecord.purged_at.is_(None),
                    or_(*(outs.contains(b) for b in part), *(params.contains(b) for b in part)),
                )
            )
            for out, p in rows:
                found.update(out or [], (p or {}).get("input_blob_ids") or [])
            task_outs = cast(UpstreamTask.output_blob_ids, Text)
            for (out,) in await session.execute(
                select(UpstreamTask.output_blob_ids).where(or_(*(task_outs.contains(b) for b in part)))
            ):
                found.update(out or [])
            found.update((await session.scalars(select(FileRecord.blob_id).where(FileRecord.blob_id.in_(part)))).all())
    return found & blob_ids


def _delete_files(gw: Gateway, blob_ids: Iterable[str]) -> None:
    for blob_id in blob_ids:
        path = gw.blobs.path(blob_id)  # None for a malformed id or a file already gone
        if path is not None:
            path.unlink(missing_ok=True)


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


def _counts(row: Any) -> dict[str, Any]:
    # PostgreSQL's SUM of integers is numeric (Decimal here): made int again.
    counts = {name: int(row[name] or 0) for name in ("requests", "succeeded", "failed", "images", "cost_micros")}
    counts["cost_usd"] = counts["cost_micros"] / 1_000_000
    return counts


def _record(row: RequestRecord) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in RequestRecord.__table__.columns}


def _pct(values: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values."""
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None
