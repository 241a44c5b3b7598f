"""Request records: the `Database` repository over SQLite or PostgreSQL (SQLAlchemy async).

A SQLite database holds prompts, webhook URLs and key hashes: its file, and the -wal and -shm files
SQLite makes beside it, are private (0600), and a new folder for it 0700. SQLite gives those files the
main file's mode, so `Database.start` makes the main file 0600 before SQLite first opens it, and
tightens files an older version left readable by others (`make_private`, with a log line).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Table, and_, bindparam, event, func, insert, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from kontext_gateway.store import ledger, notices
from kontext_gateway.store.engine import SQLITE_BEGIN_IMMEDIATE, make_engine, sqlite_file, sqlite_path
from kontext_gateway.store.migrate import code_heads, database_heads, upgrade_to_head
from kontext_gateway.store.models import FileRecord, RequestRecord, UpstreamTask, WebhookDelivery, utcnow
from kontext_gateway.store.prepared import PreparedStatement
from kontext_gateway.store.records import (
    ENDED,
    DeliveryRow,
    FileRow,
    JobStatus,
    Lane,
    RequestRow,
    TaskEnd,
    TaskRow,
)
from kontext_gateway.store.sqlite_thread import SQLiteThread

__all__ = ["Database", "RequestRecord", "make_private"]

log = logging.getLogger(__name__)

# The hot path's statements go through a connection as Core statements on these tables: no Session, no
# unit of work, no identity map (each ORM session cost more CPU than the SQL it ran).
REQUESTS = cast(Table, RequestRecord.__table__)
TASKS = cast(Table, UpstreamTask.__table__)
# The hottest of them built once, their values passed as parameters: building a statement (a bound
# parameter per value, its cache key) cost more than running it; and run on SQLite's driver itself
# (`PreparedStatement`), whose per-statement machinery cost more than the SQL. An UPDATE without
# .values() sets the columns its parameters name; ROW_ID names the row and is no column.
ROW_ID = "row_id"
INSERT_REQUEST = PreparedStatement(insert(REQUESTS))
UPDATE_REQUEST = PreparedStatement(update(REQUESTS).where(REQUESTS.c.id == bindparam(ROW_ID)).returning(*REQUESTS.c))
MORE_LOGS = "more_logs"  # the text UPDATE_REQUEST_WITH_LOGS appends to the request's logs
UPDATE_REQUEST_WITH_LOGS = PreparedStatement(
    update(REQUESTS)
    .where(REQUESTS.c.id == bindparam(ROW_ID))
    .values(logs=REQUESTS.c.logs + bindparam(MORE_LOGS))
    .returning(*REQUESTS.c)
)
SELECT_REQUEST = PreparedStatement(select(*REQUESTS.c).where(REQUESTS.c.id == bindparam(ROW_ID)))
INSERT_TASK = PreparedStatement(insert(TASKS).returning(TASKS.c.id))
UPDATE_TASK = PreparedStatement(update(TASKS).where(TASKS.c.id == bindparam(ROW_ID)))


def _claim_job(*, skip_locked: bool) -> PreparedStatement:
    """The UPDATE that claims the oldest waiting job of a lane (see Database.claim_next), its values passed
    as `wanted_lane`, `now`, `worker` and `lease_end` (no column's name: a parameter named after a
    column sets it): built once, as each idle lane runs it twice a second."""
    now = bindparam("now", type_=REQUESTS.c.created_at.type)
    waiting = (
        select(REQUESTS.c.id)
        .where(
            REQUESTS.c.lane == bindparam("wanted_lane"),
            or_(
                REQUESTS.c.status == JobStatus.STARTING,
                and_(REQUESTS.c.status == JobStatus.PROCESSING, REQUESTS.c.lease_until < now),
            ),
        )
        .order_by(REQUESTS.c.created_at, REQUESTS.c.id)
        .limit(1)
    )
    if skip_locked:
        waiting = waiting.with_for_update(skip_locked=True)
    return PreparedStatement(
        update(REQUESTS)
        .where(REQUESTS.c.id == waiting.scalar_subquery())
        .values(
            status=JobStatus.PROCESSING,
            claimed_by=bindparam("worker"),
            lease_until=bindparam("lease_end"),
            started_at=func.coalesce(REQUESTS.c.started_at, now),
            runs=REQUESTS.c.runs + 1,
        )
        .returning(*REQUESTS.c)
    )


CLAIM_JOB = _claim_job(skip_locked=False)
CLAIM_JOB_LOCKED = _claim_job(skip_locked=True)  # PostgreSQL: several processes claim at once

OPEN_DELIVERY = ("pending", "sending")  # not yet delivered, failed or dropped


def _claim_delivery(*, skip_locked: bool) -> PreparedStatement:
    """The UPDATE that claims the oldest due delivery (see Database.claim_delivery), its times passed as
    `now` and `lease_end`: built once, as an idle dispatcher runs it every second (built per call, it
    cost thirty times the SQL)."""
    deliveries = cast(Table, WebhookDelivery.__table__)
    cand, other = deliveries.alias("cand"), deliveries.alias("other")
    now = bindparam("now", type_=deliveries.c.next_attempt_at.type)
    older_open = select(other.c.id).where(
        other.c.request_id == cand.c.request_id, other.c.id < cand.c.id, other.c.state.in_(OPEN_DELIVERY)
    )
    sending = select(other.c.id).where(
        other.c.request_id == cand.c.request_id,
        other.c.id != cand.c.id,
        other.c.state == "sending",
        other.c.lease_until >= now,
    )
    due = (
        select(cand.c.id)
        .where(
            or_(
                and_(cand.c.state == "pending", cand.c.next_attempt_at <= now),
                and_(cand.c.state == "sending", cand.c.lease_until < now),
            ),
            ~older_open.exists(),
            ~sending.exists(),
        )
        .order_by(cand.c.next_attempt_at, cand.c.id)
        .limit(1)
    )
    if skip_locked:
        due = due.with_for_update(skip_locked=True, of=cand)
    return PreparedStatement(
        update(deliveries)
        .where(deliveries.c.id == due.scalar_subquery())
        .values(state="sending", lease_until=bindparam("lease_end"), attempts=deliveries.c.attempts + 1)
        .returning(*deliveries.c)
    )


CLAIM_DELIVERY = _claim_delivery(skip_locked=False)
CLAIM_DELIVERY_LOCKED = _claim_delivery(skip_locked=True)  # PostgreSQL: several processes claim at once
SELECT_KEY_ID = PreparedStatement(select(REQUESTS.c.key_id).where(REQUESTS.c.id == bindparam(ROW_ID)))

CLOSE_WAIT_S = 10.0  # the longest close() waits for statements still under way
Charge = tuple[int, list[dict[str, Any]]]  # (micros of USD, ledger line items)
T = TypeVar("T")


def _record_task_ends(conn: Connection, ended: Sequence[TaskEnd], now: datetime | None = None) -> None:
    if not ended:
        return
    now = now or utcnow()
    rows = [
        {ROW_ID: e.row, "state": e.state, "output_blob_ids": list(e.output_blob_ids), "updated_at": now} for e in ended
    ]
    UPDATE_TASK.execute(conn, rows[0] if len(rows) == 1 else rows)


def _short(text: str | None) -> str | None:
    return None if text is None else text[:500]  # the column's width


def make_private(path: Path, mode: int) -> None:
    """Set `path` to `mode` (0700, 0600) when group or others have any access to it, and log that.
    Nothing happens to a path that is absent or private already, nor where there are no POSIX modes;
    a path that cannot be changed (another owner's) is logged and left as it is."""
    if os.name != "posix":
        return
    try:
        old = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if not old & 0o077:
        return
    try:
        os.chmod(path, mode)
    except OSError as exc:
        log.warning("%s is open to other users (mode %o) and could not be made private: %s", path, old, exc)
        return
    log.warning("%s was open to other users: mode %o changed to %o", path, old, mode)


def _private_sqlite_file(url: str) -> None:
    """Make a SQLite database file 0600 (new: created empty, which SQLite takes as an empty database;
    old: tightened), with its journal files. Memory databases, URIs and other backends: nothing."""
    parsed = make_url(url)
    path = sqlite_path(url)  # the file SQLAlchemy's driver opens
    if path is None or parsed.query.get("uri"):
        return
    # The folder store.engine.make_engine would make, made private.
    Path(str(parsed.database)).expanduser().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.parent.is_dir():
        # O_EXCL: a file another process made first is left to it (and tightened below)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for suffix in ("", "-wal", "-shm", "-journal"):
        make_private(path.with_name(path.name + suffix), 0o600)


async def _connections_returned(engine: AsyncEngine) -> None:
    """Until every connection of the pool is handed back (at most CLOSE_WAIT_S). A statement shielded
    from its task's cancel (an upstream task being recorded, a webhook delivery released) may still
    hold one when the process closes, and the pool closes only the connections handed back: one left
    out would outlive its event loop."""
    pool = engine.pool
    checked_out = getattr(pool, "checkedout", None)
    if checked_out is None or not checked_out():
        return
    loop = asyncio.get_running_loop()
    returned = asyncio.Event()

    def on_checkin(*_: Any) -> None:  # before the pool counts it back: look once it has
        loop.call_soon(lambda: None if checked_out() else returned.set())

    event.listen(pool, "checkin", on_checkin)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                await returned.wait()
    finally:
        event.remove(pool, "checkin", on_checkin)


class Database:
    """Owns the engines; every method is one short transaction, so no session outlives a call.

    The job's own statements (a request's insert and updates, its upstream tasks, a claim, a read) are
    blocking functions of a connection run as one transaction by `_run`. On a SQLite file the whole
    transaction runs through the sqlite3 module, on the event loop while the file is free, else on the
    database's own thread (`SQLiteThread`): the async driver hops to its thread several times per
    statement, which cost more CPU than the SQL. Elsewhere
    (PostgreSQL, a memory database) they run on the async engine's connection. The rest (keys, history,
    files, webhooks) goes through the async engine's sessions."""

    def __init__(self, url: str, *, connect_args: dict[str, Any] | None = None) -> None:
        # connect_args goes to the driver as is (e.g. asyncpg `server_settings` for a search_path).
        self.url = url
        self._connect_args = connect_args
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._write_sessions: async_sessionmaker[AsyncSession] | None = None
        self._sqlite_thread: SQLiteThread | None = None  # what runs `_run`'s transactions, on a SQLite file
        self._announcer: notices.Announcer | None = None  # PostgreSQL: jobs queued and ended, told to the others

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.start() has not been called")
        return self._engine

    async def start(self) -> None:
        if self._engine is not None:
            return
        _private_sqlite_file(self.url)  # before SQLite first opens it: see the module
        engine = make_engine(self.url, connect_args=self._connect_args)
        try:
            await upgrade_to_head(engine)
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        immediate = engine.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})  # only SQLite's BEGIN reads it
        self._write_sessions = async_sessionmaker(immediate, expire_on_commit=False)
        if sqlite_file(self.url):
            self._sqlite_thread = SQLiteThread(self.url)
        if engine.dialect.name == "postgresql":
            self._announcer = notices.Announcer(engine)

    async def close(self) -> None:
        engine, sqlite_thread, announcer = self._engine, self._sqlite_thread, self._announcer
        self._sqlite_thread = self._announcer = None  # from here on, a late transaction takes the async engine
        if announcer is not None:
            await announcer.close()  # the notices asked for are sent
        if sqlite_thread is not None:
            await sqlite_thread.close()  # after the transactions already handed to it
        if engine is not None:
            await _connections_returned(engine)
            await engine.dispose()
        self._engine = self._sessions = self._write_sessions = None

    async def _run(self, work: Callable[[Connection], T]) -> T:
        """`work(connection)` as one transaction: committed when it returns, rolled back if it raises."""
        if self._sqlite_thread is not None:
            return await self._sqlite_thread.run(work)
        async with self.engine.begin() as conn:
            return await conn.run_sync(work)

    async def schema_problem(self) -> str | None:
        """None when the database answers and its schema is this code's; else what is wrong, in words
        (a readiness probe's answer: another process may have migrated it past this code)."""
        try:
            found = await database_heads(self.engine)
        except Exception as exc:
            return f"database unreachable: {type(exc).__name__}: {str(exc)[:200]}"
        wanted = code_heads()
        if found != wanted:
            return f"database schema at {', '.join(found) or 'nothing'}, this code needs {', '.join(wanted)}"
        return None

    def session(self, *, write: bool = False) -> AsyncSession:
        """A new session: for the store package's own repositories (keys.py, history.py...); everything
        outside the package goes through their methods.

        `write`: its transaction writes. On SQLite it then takes the write lock at BEGIN (BEGIN
        IMMEDIATE), waiting for the other connection's transaction if need be: a transaction that read
        first and writes later cannot take the lock once the job thread's connection has committed
        since its read (SQLite answers "database is locked" at once, without waiting)."""
        sessions = self._write_sessions if write else self._sessions
        if sessions is None:
            raise RuntimeError("Database.start() has not been called")
        return sessions()

    async def _update(
        self,
        id: str,
        *,
        charge: Charge | None = None,
        more_logs: str | None = None,
        ended_tasks: Sequence[TaskEnd] = (),
        **values: Any,
    ) -> RequestRow:
        """Update the request and return it as updated (one statement: UPDATE ... RETURNING); `charge`
        (micros, line items) also settles its ledger entry, in the same transaction, so a request's
        end and its cost are never recorded one without the other. None: the request has no ledger
        entry (no API key held a reservation): one statement fewer. `more_logs` is appended to its logs.
        `ended_tasks`: its upstream tasks' ends not yet recorded, committed with it."""
        stmt, params = UPDATE_REQUEST, {ROW_ID: id, **values}
        if more_logs:
            stmt, params[MORE_LOGS] = UPDATE_REQUEST_WITH_LOGS, more_logs

        def work(conn: Connection) -> RequestRow:
            updated = stmt.first(conn, params)
            if updated is None:
                raise KeyError(f"no request {id!r}")
            if charge is not None:
                ledger.settle(conn, id, charge[0], charge[1], values.get("completed_at") or utcnow())
            _record_task_ends(conn, ended_tasks)
            return RequestRow.from_row(updated)

        row = await self._run(work)
        if self._announcer is not None and row.status in ENDED:
            self._announcer.ended(id)  # its waiters elsewhere, once committed
        return row

    async def create_request(
        self,
        *,
        id: str,
        endpoint: str,
        model: str,
        mode: str,
        params: dict[str, Any],
        key_id: str | None = None,
        input: dict[str, Any] | None = None,
        version: str | None = None,
        webhook: str | None = None,
        webhook_events: list[str] | None = None,
        reservation: ledger.Reservation | None = None,
        rejected: dict[str, Any] | None = None,
        lane: Lane = Lane.HOSTED,
        claimed_by: str | None = None,
        lease_s: float = 0.0,
    ) -> RequestRow:
        """A new job, status `starting`: committed before anyone waits on it, so it survives a crash.
        With a `reservation`, its estimated cost is held against the key's budget in the same
        transaction (raising ledger.BudgetExceeded / ConcurrencyExceeded / KeyRevoked, nothing stored).
        With `claimed_by`, it is written already claimed by that worker for `lease_s` (`processing`,
        run 1), as claim_next would leave it: the worker in this process that reserved a slot runs it."""
        now = utcnow()
        values: dict[str, Any] = dict(
            id=id,
            created_at=now,
            started_at=None,
            completed_at=None,
            key_id=key_id,
            endpoint=endpoint,
            model=model,
            provider=None,
            mode=mode,
            params=params,
            status=JobStatus.STARTING,
            duration_ms=None,
            cost=None,
            currency="USD",
            output_blob_ids=[],
            attempts=[],
            error=None,
            output_size=None,
            output_format=None,
            input=input,
            version=version,
            logs="",
            webhook=webhook,
            webhook_events=webhook_events,
            cancel_requested=False,
            claimed_by=None,
            lease_until=None,
            runs=0,
            purged_at=None,
            lane=lane,
        )
        if rejected is not None:
            # Refused before it could run: stored as failed at once, never claimable by a worker.
            values.update(status=JobStatus.FAILED, error=rejected["error"], completed_at=now)
            values["duration_ms"] = rejected.get("duration_ms")
        elif claimed_by is not None:
            values.update(status=JobStatus.PROCESSING, claimed_by=claimed_by, started_at=now, runs=1)
            values["lease_until"] = now + timedelta(seconds=lease_s)

        def work(conn: Connection) -> None:
            if reservation is not None:
                ledger.hold(conn, reservation, now)
            INSERT_REQUEST.execute(conn, values)
            if reservation is not None:  # after the request's row, which it references
                conn.execute(insert(ledger.ENTRIES).values(ledger.entry(id, reservation, now)))

        await self._run(work)
        if self._announcer is not None and values["status"] == JobStatus.STARTING:
            self._announcer.new_job(lane)  # queued for a claim: wake the other processes
        return RequestRow(**values)

    async def mark_running(self, id: str, *, provider: str) -> None:
        await self._update(id, status=JobStatus.PROCESSING, provider=provider, started_at=utcnow())

    async def mark_succeeded(
        self,
        id: str,
        *,
        provider: str,
        cost: float | None,
        currency: str,
        output_blob_ids: list[str],
        attempts: list[dict[str, Any]],
        output_size: str | None,
        output_format: str | None,
        duration_ms: int,
        params: dict[str, Any] | None = None,
        logs: str | None = None,
        cost_lines: list[dict[str, Any]] | None = None,
        ledger: bool = True,
        ended_tasks: Sequence[TaskEnd] = (),
    ) -> RequestRow:
        """`cost` in USD; `cost_lines`, the ledger's line items (micros), settle its entry (`ledger`:
        whether it has one). `ended_tasks`: the job's upstream task ends still to record."""
        extra: dict[str, Any] = {"params": params} if params is not None else {}
        return await self._update(
            id,
            more_logs=logs,
            ended_tasks=ended_tasks,
            charge=(round((cost or 0) * 1_000_000), cost_lines or []) if ledger else None,
            **extra,
            status=JobStatus.SUCCEEDED,
            completed_at=utcnow(),
            provider=provider,
            cost=cost,
            currency=currency,
            output_blob_ids=list(output_blob_ids),
            attempts=list(attempts),
            output_size=output_size,
            output_format=output_format,
            duration_ms=duration_ms,
            error=None,
            lease_until=None,  # claimed_by stays: which worker ran it
        )

    async def mark_failed(
        self,
        id: str,
        *,
        error: dict[str, Any],
        attempts: list[dict[str, Any]],
        duration_ms: int,
        provider: str | None = None,
        logs: str | None = None,
        charge: Charge = (0, []),
        ledger: bool = True,
        ended_tasks: Sequence[TaskEnd] = (),
    ) -> RequestRow:
        """`charge`: what attempts that failed were still billed for (micros, line items)."""
        values: dict[str, Any] = dict(
            status=JobStatus.FAILED,
            completed_at=utcnow(),
            error=error,
            attempts=list(attempts),
            duration_ms=duration_ms,
            lease_until=None,
        )
        if provider is not None:  # None keeps the provider mark_running recorded, if any
            values["provider"] = provider
        if charge[0]:
            values["cost"] = charge[0] / 1_000_000
        return await self._update(
            id, charge=charge if ledger else None, more_logs=logs, ended_tasks=ended_tasks, **values
        )

    async def mark_canceled(
        self,
        id: str,
        *,
        attempts: list[dict[str, Any]],
        duration_ms: int | None,
        charge: Charge = (0, []),
        ledger: bool = True,
        ended_tasks: Sequence[TaskEnd] = (),
    ) -> RequestRow:
        values: dict[str, Any] = {"cost": charge[0] / 1_000_000} if charge[0] else {}
        return await self._update(
            id,
            charge=charge if ledger else None,
            ended_tasks=ended_tasks,
            status=JobStatus.CANCELED,
            completed_at=utcnow(),
            attempts=list(attempts),
            duration_ms=duration_ms,
            lease_until=None,
            **values,
        )

    # -- the job queue: claims with leases, so a crashed worker's jobs are taken up again ------------

    async def claim_next(self, worker: str, lease_s: float, lane: Lane = Lane.HOSTED) -> RequestRow | None:
        """Atomically take the oldest job of `lane` that is waiting, or whose worker's lease ran out.

        PostgreSQL: `FOR UPDATE SKIP LOCKED`, so several processes each claim a job exactly once.
        SQLite: one writer at a time, so the UPDATE with its subquery is atomic as it stands."""
        now = utcnow()
        claim = CLAIM_JOB_LOCKED if self.engine.dialect.name == "postgresql" else CLAIM_JOB
        params = {"wanted_lane": lane, "now": now, "worker": worker, "lease_end": now + timedelta(seconds=lease_s)}

        def work(conn: Connection) -> RequestRow | None:
            claimed = claim.first(conn, params)
            return None if claimed is None else RequestRow.from_row(claimed)

        return await self._run(work)

    async def renew_leases(self, worker: str, ids: list[str], lease_s: float) -> dict[str, bool]:
        """Extend this worker's leases; returns {id: cancel_requested} for the jobs it still holds."""
        if not ids:
            return {}
        until = utcnow() + timedelta(seconds=lease_s)
        async with self.session(write=True) as session, session.begin():
            await session.execute(
                update(RequestRecord)
                .where(
                    RequestRecord.id.in_(ids),
                    RequestRecord.claimed_by == worker,
                    RequestRecord.status == JobStatus.PROCESSING,
                )
                .values(lease_until=until)
            )
            rows = await session.execute(
                select(RequestRecord.id, RequestRecord.cancel_requested).where(
                    RequestRecord.id.in_(ids),
                    RequestRecord.claimed_by == worker,
                    RequestRecord.status == JobStatus.PROCESSING,
                )
            )
            return {row.id: bool(row.cancel_requested) for row in rows}

    async def release_leases(self, worker: str, ids: list[str]) -> int:
        """Hand this worker's running jobs back (it is shutting down): their leases end now, so the
        next claim takes them up without waiting for them to run out. Returns how many it held."""
        if not ids:
            return 0
        async with self.session(write=True) as session, session.begin():
            result = await session.execute(
                update(RequestRecord)
                .where(
                    RequestRecord.id.in_(ids),
                    RequestRecord.claimed_by == worker,
                    RequestRecord.status == JobStatus.PROCESSING,
                )
                # In the past, as every claimer's clock sees it (processes on other machines included).
                .values(lease_until=utcnow() - timedelta(minutes=10))
                .returning(RequestRecord.id)
            )
            released = len(result.all())
        if released and self._announcer is not None:
            self._announcer.new_job()  # claimable again, at once, by any lane
        return released

    async def request_cancel(self, id: str) -> RequestRow | None:
        """Cancel a job: at once if no worker has it yet, else flag it for its worker. Returns the record."""
        now = utcnow()

        def work(conn: Connection) -> RequestRow | None:
            result = conn.execute(
                update(REQUESTS)
                .where(REQUESTS.c.id == id, REQUESTS.c.status == JobStatus.STARTING)
                .values(status=JobStatus.CANCELED, completed_at=now, cancel_requested=True)
            )
            if result.rowcount:
                ledger.settle(conn, id, 0, [], now)  # never ran: the reservation is released
            conn.execute(
                update(REQUESTS)
                .where(REQUESTS.c.id == id, REQUESTS.c.status == JobStatus.PROCESSING)
                .values(cancel_requested=True)
            )
            row = conn.execute(select(*REQUESTS.c).where(REQUESTS.c.id == id)).first()
            return None if row is None else RequestRow.from_row(row)

        record = await self._run(work)
        if self._announcer is not None and record is not None and record.status == JobStatus.CANCELED:
            self._announcer.ended(id)  # ended by this cancel (or before: a waiter reads it either way)
        return record

    async def ended_without_completed_webhook(self, since: datetime, until: datetime | None = None) -> list[RequestRow]:
        """Jobs that ended between `since` and `until` with a webhook but no `completed` delivery
        queued (a crash between a job's end and its webhook, or a failed queueing)."""
        has_completed = (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.request_id == RequestRecord.id, WebhookDelivery.event == "completed")
            .exists()
        )
        query = (
            select(RequestRecord)
            .where(
                RequestRecord.webhook.is_not(None),
                RequestRecord.status.in_(ENDED),
                RequestRecord.completed_at >= since,
                ~has_completed,
                *([RequestRecord.completed_at < until] if until is not None else []),
            )
            .order_by(RequestRecord.completed_at)
        )
        async with self.session() as session:
            return [RequestRow.from_row(r) for r in (await session.scalars(query)).all()]

    async def append_log(self, id: str, text: str) -> None:
        async with self.session(write=True) as session, session.begin():
            await session.execute(
                update(RequestRecord).where(RequestRecord.id == id).values(logs=RequestRecord.logs + text)
            )

    # -- upstream tasks: committed before the gateway waits on them -------------------------------------

    async def record_task(
        self,
        request_id: str,
        *,
        slot: int,
        config_key: str,
        task_id: str,
        data: dict[str, Any],
        ended_tasks: Sequence[TaskEnd] = (),
    ) -> int:
        """The new task's row id. `ended_tasks`: the job's other task ends still to record, committed with it."""
        now = utcnow()
        values = dict(
            request_id=request_id,
            slot=slot,
            config_key=config_key,
            task_id=task_id,
            data=data,
            state="submitted",
            output_blob_ids=[],
            created_at=now,
            updated_at=now,
        )

        def work(conn: Connection) -> int:
            _record_task_ends(conn, ended_tasks, now)
            return int(INSERT_TASK.scalar_one(conn, values))

        return await self._run(work)

    async def finish_tasks(self, ended: Sequence[TaskEnd]) -> None:
        """Record upstream tasks' ends on their own (one transaction)."""
        await self._run(lambda conn: _record_task_ends(conn, ended))

    async def tasks_for(self, request_id: str) -> list[TaskRow]:
        query = select(UpstreamTask).where(UpstreamTask.request_id == request_id).order_by(UpstreamTask.id)
        async with self.session() as session:
            return [TaskRow.from_row(t) for t in (await session.scalars(query)).all()]

    # -- files uploaded through the files API ------------------------------------------------------------

    async def create_file(self, **values: Any) -> FileRow:
        record = FileRecord(**values)
        async with self.session(write=True) as session, session.begin():
            session.add(record)
        return FileRow.from_row(record)

    async def get_file(self, id: str) -> FileRow | None:
        async with self.session() as session:
            record = await session.get(FileRecord, id)
            return None if record is None else FileRow.from_row(record)

    # -- webhook deliveries: the delivery log, and a queue with one delivery in flight per request ---------

    async def add_delivery(self, request_id: str, *, event: str, url: str, payload: dict[str, Any]) -> int | None:
        """Queue a delivery; None when it is a second `completed` for the request (the database keeps
        one: the runner and the recovery sweep may both try)."""
        now = utcnow()
        row = WebhookDelivery(
            request_id=request_id,
            event=event,
            url=url,
            payload=payload,
            state="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        try:
            async with self.session(write=True) as session, session.begin():
                session.add(row)
                await session.flush()
                return row.id
        except IntegrityError:
            if event == "completed":
                return None
            raise

    async def claim_delivery(self, lease_s: float) -> DeliveryRow | None:
        """Atomically take a delivery that is due (or whose sender's lease ran out), counting the attempt;
        the row carries its request's `key_id` too (whose webhook secret signs it).

        Only a request's oldest open delivery is ever claimable, so a request never has two in flight
        and its events go out in order; a later event waits behind a terminal one being retried.
        PostgreSQL: `FOR UPDATE SKIP LOCKED` as in claim_next; SQLite: the UPDATE is atomic."""
        now = utcnow()
        claim = CLAIM_DELIVERY_LOCKED if self.engine.dialect.name == "postgresql" else CLAIM_DELIVERY
        params = {"now": now, "lease_end": now + timedelta(seconds=lease_s)}

        def work(conn: Connection) -> DeliveryRow | None:
            claimed = claim.first(conn, params)
            if claimed is None:
                return None
            key_id = SELECT_KEY_ID.first(conn, {ROW_ID: claimed.request_id})
            return DeliveryRow.from_row(claimed, key_id=None if key_id is None else key_id[0])

        return await self._run(work)

    async def finish_delivery(
        self, id: int, *, state: str, status: int | None = None, error: str | None = None
    ) -> None:
        """Record the outcome: `delivered`, `failed` (retries spent) or `dropped` (not to be retried)."""
        values: dict[str, Any] = {
            "state": state,
            "last_status": status,
            "last_error": _short(error),
            "lease_until": None,
        }
        if state == "delivered":
            values["delivered_at"] = utcnow()
        await self._update_delivery(id, **values)

    async def retry_delivery(self, id: int, *, at: datetime, status: int | None, error: str | None) -> None:
        await self._update_delivery(
            id, state="pending", next_attempt_at=at, last_status=status, last_error=_short(error), lease_until=None
        )

    async def release_delivery(self, id: int) -> None:
        """Shutting down mid-send: back to pending at once, the attempt not counted."""
        await self._update_delivery(
            id, state="pending", lease_until=None, next_attempt_at=utcnow(), attempts=WebhookDelivery.attempts - 1
        )

    async def drop_deliveries(self, request_id: str, *, error: str) -> None:
        """Drop a request's open deliveries (its receiver answered 410 Gone)."""
        async with self.session(write=True) as session, session.begin():
            await session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.request_id == request_id, WebhookDelivery.state.in_(OPEN_DELIVERY))
                .values(state="dropped", last_error=_short(error), lease_until=None)
            )

    async def webhook_gone(self, request_id: str) -> bool:
        """Whether the request's receiver has answered 410 Gone: nothing more is sent to it."""
        query = (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.request_id == request_id, WebhookDelivery.last_status == 410)
            .limit(1)
        )
        async with self.session() as session:
            return (await session.execute(query)).first() is not None

    async def list_deliveries(self, request_id: str) -> list[DeliveryRow]:
        """A request's delivery log, oldest first."""
        query = select(WebhookDelivery).where(WebhookDelivery.request_id == request_id).order_by(WebhookDelivery.id)
        async with self.session() as session:
            return [DeliveryRow.from_row(d) for d in (await session.scalars(query)).all()]

    async def _update_delivery(self, id: int, **values: Any) -> None:
        async with self.session(write=True) as session, session.begin():
            await session.execute(update(WebhookDelivery).where(WebhookDelivery.id == id).values(**values))

    async def get_request(self, id: str) -> RequestRow | None:
        row = await self._run(lambda conn: SELECT_REQUEST.first(conn, {ROW_ID: id}))
        return None if row is None else RequestRow.from_row(row)

    async def list_requests(
        self,
        *,
        limit: int = 20,
        before: tuple[datetime, str] | None = None,
        key_id: str | None = None,
    ) -> list[RequestRow]:
        """Newest first; `before` (created_at, id) continues a page (keyset pagination); `key_id`
        narrows to one key's requests."""
        query = (
            select(RequestRecord)
            .order_by(RequestRecord.created_at.desc(), RequestRecord.id.desc())
            .limit(max(0, limit))
        )
        if key_id is not None:
            query = query.where(RequestRecord.key_id == key_id)
        if before is not None:
            at, rid = before
            query = query.where(
                or_(RequestRecord.created_at < at, and_(RequestRecord.created_at == at, RequestRecord.id < rid))
            )
        async with self.session() as session:
            return [RequestRow.from_row(r) for r in (await session.scalars(query)).all()]

    async def count_waiting(self) -> int:
        """Jobs no worker has claimed yet (the queue depth metric)."""
        async with self.session() as session:
            return int(
                await session.scalar(
                    select(func.count()).select_from(RequestRecord).where(RequestRecord.status == JobStatus.STARTING)
                )
                or 0
            )
