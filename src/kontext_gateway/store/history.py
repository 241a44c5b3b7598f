"""The history's SQL: filtered pages of requests, usage totals grouped in SQL, observed attempts, and
purging payloads. The rules (who may see what, what a filter means to a caller) are history.py's."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Text, and_, case, cast, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from .db import OPEN_DELIVERY, Database
from .models import ApiKey, FileRecord, LedgerEntry, RequestRecord, UpstreamTask, WebhookDelivery
from .records import ENDED, JobStatus, LedgerRow, RequestRow

GROUPS = ("day", "key", "model", "provider")


@dataclass(frozen=True)
class RequestFilter:
    """Which requests: each field set narrows the set, None leaves it open."""

    owner: str | None = None  # the caller's key when it may see only its own
    key_id: str | None = None
    model: str | None = None  # a catalog id
    provider: str | None = None  # a provider ("fal": each of its config keys) or a config key
    statuses: tuple[JobStatus, ...] | None = None
    created_after: datetime | None = None  # included
    created_before: datetime | None = None  # excluded


@dataclass(frozen=True)
class Purged:
    request_ids: list[str]  # purged now (running or already purged ones are left)
    blob_ids: set[str]  # the images they named: delete those nothing else names (`referenced_blobs`)


class HistoryRows:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def page(
        self, where: RequestFilter, *, limit: int, before: tuple[datetime, str] | None = None
    ) -> list[RequestRow]:
        """Newest first, `limit` of them, after the keyset position `before` (created_at, id)."""
        conditions = _conditions(where)
        if before is not None:
            at, rid = before
            conditions.append(
                or_(RequestRecord.created_at < at, and_(RequestRecord.created_at == at, RequestRecord.id < rid))
            )
        query = (
            select(RequestRecord)
            .where(*conditions)
            .order_by(RequestRecord.created_at.desc(), RequestRecord.id.desc())
            .limit(limit)
        )
        async with self.db.session() as session:
            return [RequestRow.from_row(r) for r in (await session.scalars(query)).all()]

    async def ledger(self, request_id: str) -> LedgerRow | None:
        async with self.db.session() as session:
            entry = await session.get(LedgerEntry, request_id)
            return None if entry is None else LedgerRow.from_row(entry)

    async def attempts(self, model_id: str, since: datetime, sample: int) -> list[list[dict[str, Any]]]:
        """The attempts lists of the model's newest `sample` requests made since `since`."""
        query = (
            select(RequestRecord.attempts)
            .where(RequestRecord.model == model_id, RequestRecord.created_at >= since)
            .order_by(RequestRecord.created_at.desc())
            .limit(sample)
        )
        async with self.db.session() as session:
            return [attempts or [] for attempts in (await session.execute(query)).scalars().all()]

    async def usage(self, where: RequestFilter, groups: tuple[str, ...]) -> list[dict[str, Any]]:
        """Per group (of GROUPS: the UTC day of creation, the key and its name, the model, the
        provider): requests, succeeded, failed, images and cost in integer micros of USD."""
        columns: dict[str, Any] = {}
        if "day" in groups:
            columns["day"] = self._day(RequestRecord.created_at)
        if "key" in groups:
            columns.update(key_id=RequestRecord.key_id, key_name=ApiKey.name)
        if "model" in groups:
            columns["model"] = RequestRecord.model
        if "provider" in groups:
            columns["provider"] = RequestRecord.provider
        succeeded = RequestRecord.status == JobStatus.SUCCEEDED
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
            func.sum(case((RequestRecord.status == JobStatus.FAILED, 1), else_=0)).label("failed"),
            images.label("images"),
            cost_micros.label("cost_micros"),
        ).where(*_conditions(where))
        if "key" in groups:
            query = query.outerjoin(ApiKey, ApiKey.id == RequestRecord.key_id)
        if columns:
            query = query.group_by(*columns.values())
        async with self.db.session() as session:
            rows = (await session.execute(query)).mappings().all()
        out = []
        for row in rows:
            if not row["requests"]:
                continue  # no grouping and nothing matched: one all-NULL row
            item: dict[str, Any] = {name: row[name] for name in columns}
            if item.get("day") is not None:
                item["day"] = str(item["day"])[:10]  # a date on PostgreSQL, text on SQLite
            # PostgreSQL's SUM of integers is numeric (Decimal here): made int again.
            item.update(
                {name: int(row[name] or 0) for name in ("requests", "succeeded", "failed", "images", "cost_micros")}
            )
            out.append(item)
        return out

    def _day(self, column: Any) -> Any:
        """The UTC calendar day of a timestamp: SQLite keeps UTC text; PostgreSQL's date() would use
        the session's time zone, so the timestamp is first taken to UTC."""
        if self.db.engine.dialect.name == "postgresql":
            return func.date(func.timezone("UTC", column))
        return func.date(column)

    async def due_for_purge(self, cutoff: datetime, limit: int) -> list[str]:
        """Ended, not yet purged requests completed before `cutoff`, oldest first."""
        # created_at < cutoff holds for anything completed before it and lets the (status, created_at)
        # index narrow the scan.
        query = (
            select(RequestRecord.id)
            .where(
                RequestRecord.status.in_(ENDED),
                RequestRecord.purged_at.is_(None),
                RequestRecord.created_at < cutoff,
                RequestRecord.completed_at < cutoff,
            )
            .order_by(RequestRecord.completed_at)
            .limit(limit)
        )
        async with self.db.session() as session:
            return list((await session.scalars(query)).all())

    async def purge(self, ids: list[str], at: datetime) -> Purged:
        """In one transaction: the prompt (params.prompt) and `input` become null, the image ids are
        emptied (outputs, inputs, the upstream tasks' outputs), closed webhook deliveries lose their
        payload, and `purged_at` is set. Running or purged requests are skipped."""
        blobs: set[str] = set()
        purged: list[str] = []
        async with self.db.session(write=True) as session, session.begin():
            query = (
                select(RequestRecord)
                .where(RequestRecord.id.in_(ids), RequestRecord.status.in_(ENDED), RequestRecord.purged_at.is_(None))
                .with_for_update()
            )
            for record in (await session.scalars(query)).all():
                params = dict(record.params or {})
                blobs.update(record.output_blob_ids or [], params.get("input_blob_ids") or [])
                params.update(prompt=None, input_blob_ids=[])
                record.params, record.input, record.output_blob_ids, record.purged_at = params, None, [], at
                purged.append(record.id)
            if not purged:
                return Purged([], set())
            tasks = select(UpstreamTask).where(UpstreamTask.request_id.in_(purged))
            for task in (await session.scalars(tasks)).all():
                blobs.update(task.output_blob_ids or [])
                task.output_blob_ids = []
            deliveries = select(WebhookDelivery).where(
                WebhookDelivery.request_id.in_(purged), WebhookDelivery.state.not_in(OPEN_DELIVERY)
            )
            for delivery in (await session.scalars(deliveries)).all():
                delivery.payload = {"id": delivery.request_id, "data_removed": True}
        return Purged(purged, blobs)

    async def referenced_blobs(self, blob_ids: Iterable[str], chunk: int = 50) -> set[str]:
        """Which of `blob_ids` something still names (a request, an upstream task, an uploaded file).
        The JSON lists are searched as text (one scan per chunk, the same SQL on SQLite and
        PostgreSQL; ids are hex, safe in LIKE), then confirmed exactly."""
        wanted = set(blob_ids)
        found: set[str] = set()
        ids = sorted(wanted)
        async with self.db.session() as session:
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
                found.update(
                    (await session.scalars(select(FileRecord.blob_id).where(FileRecord.blob_id.in_(part)))).all()
                )
        return found & wanted


def _conditions(where: RequestFilter) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    if where.owner is not None:
        out.append(RequestRecord.key_id == where.owner)
    if where.key_id:
        out.append(RequestRecord.key_id == where.key_id)
    if where.model:
        out.append(RequestRecord.model == where.model)
    if where.provider:
        provider = where.provider
        # A provider name ("fal") matches each of its config keys ("fal/flux.1-kontext-pro").
        out.append(
            RequestRecord.provider == provider
            if "/" in provider
            else or_(
                RequestRecord.provider == provider, RequestRecord.provider.startswith(provider + "/", autoescape=True)
            )
        )
    if where.statuses is not None:
        out.append(RequestRecord.status.in_(where.statuses))
    if where.created_after is not None:
        out.append(RequestRecord.created_at >= where.created_after)
    if where.created_before is not None:
        out.append(RequestRecord.created_at < where.created_before)
    return out
