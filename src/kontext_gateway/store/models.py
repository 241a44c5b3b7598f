"""The tables: `requests` (one row per image request or prediction: the durable job), the upstream
tasks it submitted, its webhook deliveries, idempotency keys, uploaded files, API keys, the cost
ledger (one reservation per request, settled when it ends) and the providers' shared health."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# JSONB on PostgreSQL (indexable, compact); plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Always hands back aware UTC datetimes: SQLite stores them naive, PostgreSQL in the session zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware (UTC) datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class RequestRecord(Base):
    # Keep in step with migrations/versions: a test compares the two.
    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "req_<uuid hex>"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    key_id: Mapped[str | None] = mapped_column(String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(32))  # "images.generations" | "images.edits"
    model: Mapped[str] = mapped_column(String(128), index=True)
    provider: Mapped[str | None] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16))  # "text-to-image" | "edit"
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # Replicate's vocabulary: starting | processing | succeeded | failed | canceled
    status: Mapped[str] = mapped_column(String(16), index=True)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    # Floats out: callers do arithmetic and JSON with it, and SQLite has no decimal type anyway.
    cost: Mapped[float | None] = mapped_column(Numeric(12, 6, asdecimal=False))
    currency: Mapped[str] = mapped_column(String(3), default="USD", server_default="USD")
    output_blob_ids: Mapped[list[str]] = mapped_column(JSONType, default=list)
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # the OpenAI error object
    output_size: Mapped[str | None] = mapped_column(String(16))  # "WxH"
    output_format: Mapped[str | None] = mapped_column(String(8))
    # -- the job (migration 0002) --
    input: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # as the client sent it, images by reference
    version: Mapped[str | None] = mapped_column(String(128))
    logs: Mapped[str] = mapped_column(Text, default="", server_default="")
    webhook: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[str] | None] = mapped_column(JSONType)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    claimed_by: Mapped[str | None] = mapped_column(String(64))  # the worker running it
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())  # reclaimable after this
    runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # -- accounts (migration 0004) --
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # prompts and images removed
    # -- lanes (migration 0006) --
    # Which claim loop runs it: "hosted" (many at once, waiting on upstreams) or "local" (the engine's
    # own few), so neither kind of job ever queues behind the other.
    lane: Mapped[str] = mapped_column(String(8), default="hosted", server_default="hosted")

    __table_args__ = (
        Index("ix_requests_claim", "status", "created_at"),
        Index("ix_requests_claim_lane", "lane", "status", "created_at"),
    )


class UpstreamTask(Base):
    """A task submitted to an upstream, committed before the gateway waits on it: after a crash the
    job resumes by polling it, never by submitting again."""

    __tablename__ = "upstream_tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(40), ForeignKey("requests.id", ondelete="CASCADE"), index=True)
    slot: Mapped[int] = mapped_column(Integer)  # index of the task's first image in the request
    config_key: Mapped[str] = mapped_column(String(96))
    task_id: Mapped[str] = mapped_column(String(256))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    state: Mapped[str] = mapped_column(String(16))  # submitted | done | failed
    output_blob_ids: Mapped[list[str]] = mapped_column(JSONType, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(40), ForeignKey("requests.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))  # start | output | logs | completed
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    state: Mapped[str] = mapped_column(String(16))  # pending | sending | delivered | failed | dropped
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        # One terminal webhook per prediction, whoever queues it (the runner or the recovery sweep).
        Index(
            "uq_webhook_deliveries_completed",
            "request_id",
            unique=True,
            sqlite_where=text("event = 'completed'"),
            postgresql_where=text("event = 'completed'"),
        ),
    )


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)  # the API key's id, or ""
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of method, path and body
    request_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FileRecord(Base):
    """A file uploaded through Replicate's files API, to be used as an input image by URL."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    blob_id: Mapped[str] = mapped_column(String(80))
    name: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    key_id: Mapped[str | None] = mapped_column(String(64))  # the uploader (migration 0005); None: open gateway


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; the key itself is shown once, when it is created.

    Spend is kept on the row (`spent_micros` in the current budget period, `reserved_micros` for
    requests still running) so that a reservation is one conditional UPDATE: atomic on SQLite and
    PostgreSQL alike, however many requests race for the last dollar."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "key_<hex>", safe to log and show
    name: Mapped[str] = mapped_column(String(128))
    hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    hint: Mapped[str] = mapped_column(String(32))  # "kx-AbCd...wXyZ": enough to recognise it
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    models: Mapped[list[str] | None] = mapped_column(JSONType)  # allowed model ids; None: all
    budget_micros: Mapped[int | None] = mapped_column(BigInteger)  # USD micros; None: no budget
    budget_period: Mapped[str | None] = mapped_column(String(8))  # day | week | month; None: lifetime
    rpm: Mapped[int | None] = mapped_column(Integer)  # requests (creations) per minute
    ipm: Mapped[int | None] = mapped_column(Integer)  # images per minute
    max_concurrent: Mapped[int | None] = mapped_column(Integer)  # requests running at once
    period_start: Mapped[datetime | None] = mapped_column(UTCDateTime())  # of spent_micros
    spent_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    total_spent_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class LedgerEntry(Base):
    """The money side of one request: reserved before it runs, settled (actual cost, line items)
    in the same transaction that records how it ended."""

    __tablename__ = "ledger"

    request_id: Mapped[str] = mapped_column(String(40), ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True)
    key_id: Mapped[str | None] = mapped_column(String(40), index=True)
    state: Mapped[str] = mapped_column(String(12))  # reserved | settled
    estimate_micros: Mapped[int] = mapped_column(BigInteger)  # reserved: the worst case over the candidates
    actual_micros: Mapped[int | None] = mapped_column(BigInteger)
    lines: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)  # what the actual cost is made of
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ProviderHealthRecord(Base):
    """One provider config key's circuit breaker and latency EWMA, shared by every gateway process whose
    `provider_health_url` names this database (store/provider_health.py). Times are the database's."""

    __tablename__ = "provider_health"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)  # config key, e.g. "fal/flux.1-kontext-pro"
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # consecutive, all processes
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # None: closed
    probe_until: Mapped[datetime | None] = mapped_column(UTCDateTime())  # the half-open probe's lease
    probe_token: Mapped[str | None] = mapped_column(String(40))  # who holds that lease
    latency_s: Mapped[float | None] = mapped_column(Float)  # EWMA of successful durations
