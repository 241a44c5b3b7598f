"""The cost ledger's statements, run inside the transactions that create and finish a request.

Reserve (with the request's insert): one conditional UPDATE of the key row adds the estimate to
`reserved_micros` only if spent + reserved + estimate still fits the budget. The row lock it takes
(PostgreSQL) or the database write lock (SQLite) serialises racing requests for one key, and the
condition is evaluated on the latest row, so concurrent requests cannot overspend. The concurrency
limit is counted under that same lock.

Settle (with the request's terminal status): the reservation is released and the actual cost
charged, once (the entry moves from `reserved` to `settled` in the same statement that checks it).

Both run on the caller's connection, inside its transaction, as blocking calls (see `Database._run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, case, func, or_, select, update

from .models import ApiKey, LedgerEntry, RequestRecord
from .records import RUNNING

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # the one "period" of a lifetime budget
PERIODS = ("day", "week", "month")


def period_start(period: str | None, now: datetime) -> datetime:
    """Start of the budget period `now` falls in (UTC): midnight, Monday, or the 1st."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return EPOCH


@dataclass
class Reservation:
    key_id: str | None  # None: the open gateway, nothing to hold against
    estimate_micros: int
    budget_period: str | None = None
    max_concurrent: int | None = None


class BudgetExceeded(Exception):
    def __init__(
        self, budget_micros: int, spent_micros: int, reserved_micros: int, needed_micros: int, period: str | None
    ) -> None:
        super().__init__("budget exceeded")
        self.budget_micros, self.spent_micros = budget_micros, spent_micros
        self.reserved_micros, self.needed_micros, self.period = reserved_micros, needed_micros, period


class ConcurrencyExceeded(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__("too many concurrent requests")
        self.limit = limit


class KeyRevoked(Exception):
    pass


ENTRIES = cast(Table, LedgerEntry.__table__)


def hold(conn: Connection, r: Reservation, now: datetime) -> None:
    """Before the request's insert: reserve against the key (or raise). No-op without a key."""
    if r.key_id is None:
        return
    ps = period_start(r.budget_period, now)
    spent_now = case((ApiKey.period_start == ps, ApiKey.spent_micros), else_=0)
    result = conn.execute(
        update(ApiKey)
        .where(
            ApiKey.id == r.key_id,
            ApiKey.revoked_at.is_(None),
            or_(
                ApiKey.budget_micros.is_(None),
                spent_now + ApiKey.reserved_micros + r.estimate_micros <= ApiKey.budget_micros,
            ),
        )
        .values(
            spent_micros=spent_now,
            period_start=ps,
            reserved_micros=ApiKey.reserved_micros + r.estimate_micros,
            last_used_at=now,
        )
    )
    if result.rowcount == 0:
        key = conn.execute(select(*ApiKey.__table__.c).where(ApiKey.id == r.key_id)).first()
        if key is None or key.revoked_at is not None:
            raise KeyRevoked()
        spent = key.spent_micros if key.period_start == ps else 0
        raise BudgetExceeded(key.budget_micros or 0, spent, key.reserved_micros, r.estimate_micros, key.budget_period)
    if r.max_concurrent is not None:
        running = conn.execute(
            select(func.count())
            .select_from(RequestRecord)
            .where(RequestRecord.key_id == r.key_id, RequestRecord.status.in_(RUNNING))
        ).scalar_one()
        if running >= r.max_concurrent:
            raise ConcurrencyExceeded(r.max_concurrent)  # the caller rolls back, releasing the hold


def entry(request_id: str, r: Reservation, now: datetime) -> dict[str, Any]:
    """The ledger row's values, inserted after the request's row (it references it)."""
    return dict(
        request_id=request_id,
        key_id=r.key_id,
        state="reserved",
        estimate_micros=r.estimate_micros,
        lines=[],
        created_at=now,
    )


def settle(conn: Connection, request_id: str, actual_micros: int, lines: list[dict[str, Any]], now: datetime) -> None:
    """Release the reservation and charge the actual cost, exactly once (a no-op the second time,
    and for requests that never held one, such as rejected ones)."""
    row = conn.execute(
        update(LedgerEntry)
        .where(LedgerEntry.request_id == request_id, LedgerEntry.state == "reserved")
        .values(state="settled", actual_micros=actual_micros, lines=lines, settled_at=now)
        .returning(LedgerEntry.key_id, LedgerEntry.estimate_micros)
    ).first()
    if row is None or row.key_id is None:
        return
    period = conn.execute(select(ApiKey.budget_period).where(ApiKey.id == row.key_id)).first()
    if period is None:
        return
    # Charged to the period the request ends in (a new period starts from zero).
    ps = period_start(period.budget_period, now)
    spent_now = case((ApiKey.period_start == ps, ApiKey.spent_micros), else_=0)
    conn.execute(
        update(ApiKey)
        .where(ApiKey.id == row.key_id)
        .values(
            spent_micros=spent_now + actual_micros,
            period_start=ps,
            reserved_micros=ApiKey.reserved_micros - row.estimate_micros,
            total_spent_micros=ApiKey.total_spent_micros + actual_micros,
        )
    )
