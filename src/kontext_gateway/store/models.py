"""The `requests` table: one row per image request, from queued to its outcome."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, Numeric, String
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
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued | running | succeeded | failed
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    # Floats out: callers do arithmetic and JSON with it, and SQLite has no decimal type anyway.
    cost: Mapped[float | None] = mapped_column(Numeric(12, 6, asdecimal=False))
    currency: Mapped[str] = mapped_column(String(3), default="USD", server_default="USD")
    output_blob_ids: Mapped[list[str]] = mapped_column(JSONType, default=list)
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # the OpenAI error object
    output_size: Mapped[str | None] = mapped_column(String(16))  # "WxH"
    output_format: Mapped[str | None] = mapped_column(String(8))
