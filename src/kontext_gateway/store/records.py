"""What the store hands out: typed, detached snapshots of rows (frozen dataclasses), never ORM objects.

A caller reads `record.status`, not `record["status"]`: a misspelt field is a type error, not a None
at run time, and no session (or lazy load) hides behind a record. `JobStatus` is the one definition
of a job's states and of which of them are still running or ended.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Self

from sqlalchemy.engine import Row


class Lane(StrEnum):
    """Which claim loop runs a job. Hosted jobs mostly wait on an upstream, so a process runs hundreds;
    local-engine jobs hold the engine, so it claims only a few: neither kind queues behind the other."""

    HOSTED = "hosted"
    LOCAL = "local"


class JobStatus(StrEnum):
    """A request's (a job's) state, in Replicate's vocabulary. A str: it compares equal to, and
    serialises as, its value."""

    STARTING = "starting"  # queued: no worker has it yet
    PROCESSING = "processing"  # a worker runs it
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def ended(self) -> bool:
        return self in ENDED


RUNNING: frozenset[JobStatus] = frozenset({JobStatus.STARTING, JobStatus.PROCESSING})
ENDED: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class _FromRow:
    """Built from an ORM row by field name: the dataclass's fields are the table's columns."""

    __slots__ = ()

    @classmethod
    def from_row(cls, row: Any, **overrides: Any) -> Self:
        result: Self = _from_row(cls, row, overrides)
        return result


def _from_row(cls: type, row: Any, overrides: dict[str, Any]) -> Any:
    # `row`: an ORM object, or a Core row (the hot path's statements), read by attribute alike.
    source: tuple[str, ...] | type = tuple(row._fields) if isinstance(row, Row) else type(row)
    values = {name: getattr(row, name) for name in _columns(cls, source) if name not in overrides}
    return cls(**values, **overrides)


@functools.cache
def _columns(cls: type, source: tuple[str, ...] | type) -> tuple[str, ...]:
    """The fields read from a row (its type, or a Core row's column names): all but those with a
    default that the row lacks (a claimed delivery's key_id, which the claim adds)."""

    def has(name: str) -> bool:
        return name in source if isinstance(source, tuple) else hasattr(source, name)

    return tuple(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING or has(f.name))


@dataclass(frozen=True, slots=True)
class RequestRow(_FromRow):
    """One image request or prediction: the durable job (table `requests`)."""

    id: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    key_id: str | None
    endpoint: str
    model: str
    provider: str | None
    mode: str
    params: dict[str, Any]  # the job as jobs/spec.py writes it
    status: JobStatus
    duration_ms: int | None
    cost: float | None
    currency: str
    output_blob_ids: list[str]
    attempts: list[dict[str, Any]]
    error: dict[str, Any] | None  # the OpenAI error object, with the status and headers to replay it
    output_size: str | None
    output_format: str | None
    input: dict[str, Any] | None
    version: str | None
    logs: str
    webhook: str | None
    webhook_events: list[str] | None
    cancel_requested: bool
    claimed_by: str | None
    lease_until: datetime | None
    runs: int
    purged_at: datetime | None
    lane: Lane = Lane.HOSTED

    @classmethod
    def from_row(cls, row: Any, **overrides: Any) -> Self:
        result: Self = _from_row(
            cls,
            row,
            {"status": JobStatus(row.status), "lane": Lane(row.lane), **overrides},
        )
        return result


@dataclass(frozen=True, slots=True)
class TaskRow(_FromRow):
    """A task submitted upstream (table `upstream_tasks`)."""

    id: int
    request_id: str
    slot: int
    config_key: str
    task_id: str
    data: dict[str, Any]
    state: str  # submitted | done | failed
    output_blob_ids: list[str]


@dataclass(frozen=True, slots=True)
class TaskEnd:
    """How an upstream task ended, for its `upstream_tasks` row: "done" with the blobs its images were
    stored as, or "failed"."""

    row: int
    state: str
    output_blob_ids: list[str]


@dataclass(frozen=True, slots=True)
class FileRow(_FromRow):
    """A file uploaded through the files API (table `files`)."""

    id: str
    blob_id: str
    name: str
    content_type: str
    size: int
    sha256: str
    metadata_: dict[str, Any]
    created_at: datetime
    expires_at: datetime | None
    key_id: str | None


@dataclass(frozen=True, slots=True)
class DeliveryRow(_FromRow):
    """A webhook delivery (table `webhook_deliveries`); when claimed, with its request's key."""

    id: int
    request_id: str
    event: str
    url: str
    payload: dict[str, Any]
    state: str  # pending | sending | delivered | failed | dropped
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    lease_until: datetime | None
    key_id: str | None = None  # the request's: whose webhook secret signs it (set on a claim)


@dataclass(frozen=True, slots=True)
class KeyRow(_FromRow):
    """An API key (table `api_keys`): its hash, never the key."""

    id: str
    name: str
    hash: str
    hint: str
    admin: bool
    models: list[str] | None
    budget_micros: int | None
    budget_period: str | None
    rpm: int | None
    ipm: int | None
    max_concurrent: int | None
    period_start: datetime | None
    spent_micros: int
    reserved_micros: int
    total_spent_micros: int
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class LedgerRow(_FromRow):
    """The money side of one request (table `ledger`)."""

    request_id: str
    key_id: str | None
    state: str  # reserved | settled
    estimate_micros: int
    actual_micros: int | None
    lines: list[dict[str, Any]]
    created_at: datetime
    settled_at: datetime | None


@dataclass(frozen=True, slots=True)
class HealthRow:
    """One provider config key's shared health, as a shared health store (table `provider_health`, or
    Redis) holds it. Times are that store's clock, in seconds since the epoch."""

    failures: int = 0  # consecutive failures, counted across processes
    opened_at: float | None = None  # when the breaker last opened; None: closed
    probe_until: float | None = None  # a half-open probe's lease runs until then
    latency_s: float | None = None  # EWMA of successful durations; None: none seen yet


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """Rows read in one step, with the store's clock at that moment (to judge them by)."""

    now: float
    rows: dict[str, HealthRow]


@dataclass(frozen=True, slots=True)
class LatencyBatch:
    """Latency samples of one key folded into one update: an EWMA `e` becomes `scale * e + offset`;
    with no EWMA yet it becomes `first` (the samples' own EWMA)."""

    first: float
    scale: float
    offset: float
