"""The request store against SQLite (a tmp file) and the real PostgreSQL (a throwaway schema)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import sqlite3
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from conftest import PATIENCE_S, await_until, png_bytes
from kontext_gateway.jobs.journal import DurableJournal
from kontext_gateway.params import Size
from kontext_gateway.providers.base import ProviderImage
from kontext_gateway.providers.calls import Task
from kontext_gateway.store.blobs import LocalBlobStore
from kontext_gateway.store.db import Database
from kontext_gateway.store.models import Base, RequestRecord
from kontext_gateway.store.records import Lane

HEAD = "0007"  # the newest migration
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@dataclass
class Backend:
    name: str
    url: str
    connect_args: dict[str, Any] = field(default_factory=dict)

    def database(self) -> Database:
        return Database(self.url, connect_args=self.connect_args)


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        # A directory that does not exist yet: start() must create it.
        yield Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'data' / 'kontext.db'}")
        return
    try:
        admin = await asyncpg.connect(PG_DSN, timeout=PATIENCE_S)  # refused at once when it is not there
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {e!r}")
    # A fresh schema per test, first (and only) on the search_path of every connection the store opens:
    # its tables and alembic_version land there, and dropping it leaves the database as it was.
    schema = f"test_{uuid.uuid4().hex[:16]}"
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield Backend("postgresql", PG_URL, {"server_settings": {"search_path": schema}})
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture
async def db(backend: Backend) -> AsyncIterator[Database]:
    database = backend.database()
    await database.start()
    try:
        yield database
    finally:
        await database.close()


def _schema_state(conn: Connection) -> dict[str, Any]:
    insp = inspect(conn)
    diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    return {
        "tables": set(insp.get_table_names()),
        "indexes": {ix["name"] for ix in insp.get_indexes("requests")},
        "versions": conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all(),
        "diffs": diffs,
    }


async def _state(database: Database) -> dict[str, Any]:
    async with database.engine.connect() as conn:
        return await conn.run_sync(_schema_state)


def _new_id() -> str:
    return f"req_{uuid.uuid4().hex}"


async def test_migration_creates_table_matching_models(db: Database) -> None:
    state = await _state(db)
    assert {
        "requests",
        "upstream_tasks",
        "webhook_deliveries",
        "idempotency_keys",
        "files",
        "api_keys",
        "ledger",
        "provider_health",
        "alembic_version",
    } <= state["tables"]
    assert {
        "ix_requests_created_at",
        "ix_requests_key_id",
        "ix_requests_model",
        "ix_requests_status",
        "ix_requests_claim",
    } <= state["indexes"]
    assert state["versions"] == [HEAD]
    assert state["diffs"] == []  # the migration and the models agree


async def test_migration_is_idempotent(backend: Backend) -> None:
    for _ in range(2):
        database = backend.database()
        await database.start()
        state = await _state(database)
        await database.close()
        assert state["versions"] == [HEAD]


async def test_concurrent_starts_do_not_race(backend: Backend) -> None:
    databases = [backend.database() for _ in range(4)]
    try:
        await asyncio.gather(*(d.start() for d in databases))
        assert (await _state(databases[0]))["versions"] == [HEAD]
        # Every instance is usable afterwards.
        for d in databases:
            await d.create_request(
                id=_new_id(), endpoint="images.generations", model="m", mode="text-to-image", params={}
            )
        assert len(await databases[0].list_requests()) == 4
    finally:
        for d in databases:
            await d.close()


# Started in separate interpreters, which all call start() together: each says it is ready (its imports
# done) and waits for the word, given once all are ready, however long a busy machine takes to get there.
_STARTER = """
import asyncio, json, sys
from kontext_gateway.store.db import Database

async def main() -> None:
    db = Database(sys.argv[1], connect_args=json.loads(sys.argv[2]))
    print("ready", flush=True)
    sys.stdin.readline()
    await db.start()
    await db.close()

asyncio.run(main())
"""


async def test_concurrent_processes_do_not_race(backend: Backend) -> None:
    args = (sys.executable, "-c", _STARTER, backend.url, json.dumps(backend.connect_args))
    procs = [
        await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        for _ in range(3)
    ]
    said = [b""] * len(procs)
    for i, proc in enumerate(procs):  # all imported, so the migrations really overlap
        assert proc.stdout is not None
        while not said[i].endswith(b"ready\n") and not proc.stdout.at_eof():
            said[i] += await asyncio.wait_for(proc.stdout.readline(), timeout=PATIENCE_S)
    go = (p.communicate(b"go\n") for p in procs)
    outputs = await asyncio.wait_for(asyncio.gather(*go), timeout=PATIENCE_S)
    for proc, before, (out, _) in zip(procs, said, outputs, strict=True):
        assert proc.returncode == 0, (before + out).decode(errors="replace")
    database = backend.database()
    await database.start()
    try:
        assert (await _state(database))["versions"] == [HEAD]
    finally:
        await database.close()


async def test_lifecycle_succeeded(db: Database) -> None:
    rid = _new_id()
    params = {"prompt": "a red fox", "size": "1024x1024", "n": 1, "extra": {"nested": [1, 2]}}
    before = datetime.now(UTC)
    await db.create_request(
        id=rid,
        endpoint="images.generations",
        model="flux-kontext-pro",
        mode="text-to-image",
        params=params,
        key_id="k1",
    )
    row = await db.get_request(rid)
    assert row is not None
    assert row.status == "starting"
    assert row.params == params
    assert row.key_id == "k1"
    assert row.currency == "USD"
    assert row.output_blob_ids == [] and row.attempts == []
    assert row.started_at is None and row.completed_at is None and row.error is None
    assert row.created_at.tzinfo is not None and row.created_at >= before.replace(microsecond=0)

    await db.mark_running(rid, provider="bfl")
    row = await db.get_request(rid)
    assert row is not None and row.status == "processing" and row.provider == "bfl"
    assert row.started_at is not None and row.started_at.utcoffset().total_seconds() == 0

    attempts = [{"provider": "bfl", "ok": True, "ms": 1234}]
    blobs = ["a" * 64 + ".png", "b" * 64 + ".png"]
    await db.mark_succeeded(
        rid,
        provider="bfl",
        cost=0.04,
        currency="USD",
        output_blob_ids=blobs,
        attempts=attempts,
        output_size="1024x768",
        output_format="png",
        duration_ms=1234,
    )
    row = await db.get_request(rid)
    assert row is not None
    assert row.status == "succeeded"
    assert isinstance(row.cost, float) and row.cost == pytest.approx(0.04)
    assert row.output_blob_ids == blobs
    assert row.attempts == attempts
    assert (row.output_size, row.output_format, row.duration_ms) == ("1024x768", "png", 1234)
    assert row.completed_at >= row.started_at >= row.created_at
    assert {f.name for f in dataclasses.fields(row)} == {c.key for c in Base.metadata.tables["requests"].columns}


async def test_json_columns_keep_any_value_an_upstream_answer_can_carry(db: Database) -> None:
    # What a job keeps of an upstream's parsed answer can hold what json.loads makes of hostile JSON: a
    # NaN (which json.dumps writes as `NaN`, refused by PostgreSQL's JSONB), integers past 64 bits, text
    # outside ASCII. Each is stored on both backends and read back as JSON can say it.
    common = {"prompt": "a fox at dusk, café lights ☕", "score": float("nan"), "ratio": float("-inf")}
    small = {**common, "seed": 2**63 - 1, "nested": [{"x": -(2**63)}, 1.5, None, True]}
    large = {**common, "seed": 2**70 + 1, "nested": [{"x": -(2**65)}, 1.5, None, True]}
    for params in (small, large):
        rid = _new_id()
        await db.create_request(
            id=rid, endpoint="images.generations", model="flux-kontext-pro", mode="text-to-image", params=params
        )
        row = await db.get_request(rid)
        assert row is not None
        assert row.params == {**params, "score": None, "ratio": None}
        assert isinstance(row.params["seed"], int) and isinstance(row.params["nested"][0]["x"], int)


async def test_a_claim_takes_the_oldest_waiting_job_of_its_lane_and_a_lapsed_one_again(db: Database) -> None:
    ids = {name: _new_id() for name in ("older", "newer", "engine")}
    for name, lane in (("older", Lane.HOSTED), ("newer", Lane.HOSTED), ("engine", Lane.LOCAL)):
        await db.create_request(
            id=ids[name], endpoint="images.generations", model="m", mode="text-to-image", params={}, lane=lane
        )
    before = datetime.now(UTC)
    first = await db.claim_next("w1", 60.0, Lane.HOSTED)
    assert first is not None and first.id == ids["older"]
    assert (first.status, first.claimed_by, first.runs) == ("processing", "w1", 1)
    assert first.started_at is not None and first.started_at >= before.replace(microsecond=0)
    assert first.lease_until is not None and 50 < (first.lease_until - first.started_at).total_seconds() <= 60
    second = await db.claim_next("w1", 60.0, Lane.HOSTED)
    assert second is not None and second.id == ids["newer"]
    assert await db.claim_next("w1", 60.0, Lane.HOSTED) is None  # both held; the engine's job is not this lane's
    engine = await db.claim_next("w1", 60.0, Lane.LOCAL)
    assert engine is not None and engine.id == ids["engine"]

    # Its worker's lease ran out: another worker takes it, a second run, its start kept.
    await db._update(ids["older"], lease_until=datetime(2000, 1, 1, tzinfo=UTC))
    again = await db.claim_next("w2", 60.0, Lane.HOSTED)
    assert again is not None and again.id == ids["older"]
    assert (again.claimed_by, again.runs, again.started_at) == ("w2", 2, first.started_at)
    stored = await db.get_request(ids["older"])
    assert stored is not None and (stored.claimed_by, stored.runs, stored.started_at) == ("w2", 2, first.started_at)


async def test_failed_keeps_error_and_provider(db: Database) -> None:
    rid = _new_id()
    await db.create_request(id=rid, endpoint="images.edits", model="flux-kontext-dev", mode="edit", params={"n": 1})
    await db.mark_running(rid, provider="local")
    error = {"message": "out of memory", "type": "server_error", "param": None, "code": "engine_error"}
    attempts = [{"provider": "local", "ok": False, "error": "oom"}]
    await db.mark_failed(rid, error=error, attempts=attempts, duration_ms=50)
    row = await db.get_request(rid)
    assert row is not None
    assert row.status == "failed"
    assert row.error == error
    assert row.attempts == attempts
    assert row.provider == "local"  # not overwritten by provider=None
    assert row.duration_ms == 50 and row.completed_at is not None and row.cost is None

    await db.mark_failed(rid, error=error, attempts=attempts, duration_ms=60, provider="fal")
    row = await db.get_request(rid)
    assert row is not None and row.provider == "fal"


async def test_list_newest_first(db: Database) -> None:
    ids = [_new_id() for _ in range(5)]
    for rid in ids:
        await db.create_request(id=rid, endpoint="images.generations", model="m", mode="text-to-image", params={})
        await asyncio.sleep(0.002)  # distinct created_at even on a coarse clock
    assert [r.id for r in await db.list_requests()] == ids[::-1]
    assert [r.id for r in await db.list_requests(limit=2)] == ids[:-3:-1]


async def test_unknown_request(db: Database) -> None:
    assert await db.get_request("req_nope") is None
    assert await db.list_requests() == []
    with pytest.raises(KeyError):
        await db.mark_running("req_nope", provider="x")


async def test_sqlite_pragmas(tmp_path: Any) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    await database.start()
    try:
        async with database.engine.connect() as conn:
            values = [
                (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            ]
        assert values == ["wal", 1, 15000, 1]  # synchronous=NORMAL is 1
    finally:
        await database.close()


async def test_start_waits_for_another_opener_holding_a_new_files_write_lock(tmp_path: pathlib.Path) -> None:
    """Switching a new file to WAL while another process holds its write lock makes SQLite answer
    "database is locked" at once, busy_timeout or not; start() waits for the lock instead."""
    path = tmp_path / "k.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # rollback mode, as new
    other.execute("CREATE TABLE other_process (x)")
    other.execute("BEGIN IMMEDIATE")
    database = Database(f"sqlite+aiosqlite:///{path}")
    starting = asyncio.ensure_future(database.start())
    await asyncio.sleep(0.2)  # the start is waiting (or would have failed already without the wait)
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(starting, timeout=PATIENCE_S)
    try:
        async with database.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        assert (await _state(database))["versions"] == [HEAD]
    finally:
        await database.close()


async def test_close_waits_for_a_statement_still_under_way(tmp_path: pathlib.Path) -> None:
    """A statement shielded from its task's cancel can still hold the connection when the process
    closes; close() lets it finish, so no connection is left open past the event loop."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    await db.start()
    holding = asyncio.Event()

    async def late_statement() -> int:
        async with db.engine.connect() as conn:
            holding.set()
            await asyncio.sleep(0.2)  # still under way when close() is called
            return int((await conn.execute(text("SELECT 1"))).scalar_one())

    statement = asyncio.ensure_future(late_statement())
    await holding.wait()
    await db.close()
    assert statement.done() and statement.result() == 1


async def test_job_statements_keep_foreign_keys(db: Database) -> None:
    """The job's transactions (on SQLite, connections of their own) enforce the same
    constraints: a task of no request is refused and nothing is left behind."""
    with pytest.raises(IntegrityError):
        await db.record_task("req_missing", slot=0, config_key="bfl/flux-kontext-pro", task_id="t1", data={})
    rid = _new_id()
    await db.create_request(id=rid, endpoint="images.generate", model="m", mode="generate", params={})
    row = await db.record_task(rid, slot=0, config_key="bfl/flux-kontext-pro", task_id="t1", data={"a": 1})
    assert [(t.id, t.task_id, t.data) for t in await db.tasks_for(rid)] == [(row, "t1", {"a": 1})]


def _write_lock(path: pathlib.Path) -> sqlite3.Connection:
    """Another connection (as another process would) holding the file's write lock until it commits."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


async def test_close_lets_the_job_transactions_already_handed_over_commit(tmp_path: pathlib.Path) -> None:
    """On a SQLite file whose write lock another connection holds, the job's transactions queue for
    the database's thread; close() waits for the ones already queued (a drain hands back jobs whose
    last writes are still in that queue)."""
    path = tmp_path / "k.db"
    url = f"sqlite+aiosqlite:///{path}"
    db = Database(url)
    await db.start()
    other = _write_lock(path)
    ids = [_new_id() for _ in range(40)]
    creating = [
        asyncio.ensure_future(
            db.create_request(id=i, endpoint="images.generate", model="m", mode="generate", params={})
        )
        for i in ids
    ]
    await asyncio.sleep(0)  # every one has handed its transaction over
    closing = asyncio.ensure_future(db.close())
    await asyncio.sleep(0.05)
    assert not closing.done() and not any(t.done() for t in creating)
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(closing, timeout=PATIENCE_S)
    assert all(t.done() and t.exception() is None for t in creating)
    again = Database(url)
    await again.start()
    try:
        assert [(await again.get_request(i)) is not None for i in ids] == [True] * len(ids)
    finally:
        await again.close()


async def test_a_lost_sqlite_connection_is_made_again_for_the_next_transaction(tmp_path: pathlib.Path) -> None:
    """The job's transactions keep their connection; when one is lost (invalidated by a
    connection-level error), the failing transaction fails alone and the next one gets a new connection."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    await db.start()
    try:
        kept = await db._run(lambda conn: conn.connection.dbapi_connection)

        def lose_it(conn: Connection) -> None:
            conn.invalidate()
            raise OSError("disk gone")

        with pytest.raises(OSError, match="disk gone"):
            await db._run(lose_it)
        rid = _new_id()
        await db.create_request(id=rid, endpoint="images.generate", model="m", mode="generate", params={})
        assert (await db.get_request(rid)) is not None
        assert await db._run(lambda conn: conn.connection.dbapi_connection) is not kept
    finally:
        await db.close()


async def test_a_job_transaction_runs_on_the_event_loop_while_the_file_is_free(tmp_path: pathlib.Path) -> None:
    """No hop to another thread when nothing stands in the way: the transaction runs, and commits, on
    the caller's thread, and the SQLite thread is never started."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    await db.start()
    try:
        rid = _new_id()
        where: list[threading.Thread] = []

        def work(conn: Connection) -> None:
            where.append(threading.current_thread())
            conn.execute(text("UPDATE requests SET model = 'm2' WHERE id = :id"), {"id": rid})

        await db.create_request(id=rid, endpoint="images.generate", model="m", mode="generate", params={})
        await db._run(work)
        assert where == [threading.current_thread()]
        assert db._sqlite_thread is not None and db._sqlite_thread.threads == ()
        row = await db.get_request(rid)
        assert row is not None and row.model == "m2"
    finally:
        await db.close()


async def test_a_job_transaction_waits_for_another_writer_on_the_thread_not_on_the_loop(
    tmp_path: pathlib.Path,
) -> None:
    """While another connection holds the write lock, the transaction waits for it on the SQLite
    thread (the loop keeps serving meanwhile) and commits once the lock is free; the next one, with
    the file free again, runs on the loop."""
    path = tmp_path / "k.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.start()
    try:
        other = _write_lock(path)
        rid = _new_id()
        creating = asyncio.ensure_future(
            db.create_request(id=rid, endpoint="images.generate", model="m", mode="generate", params={})
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(5):
            await asyncio.sleep(0.02)
        # On the loop, SQLite's busy wait (15 s) would have held these five turns for its whole length.
        assert loop.time() - started < 7.5 and not creating.done()
        other.execute("COMMIT")
        other.close()
        row = await asyncio.wait_for(creating, timeout=PATIENCE_S)
        assert row.id == rid and (await db.get_request(rid)) is not None
        assert db._sqlite_thread is not None and [t.name for t in db._sqlite_thread.threads] == ["kontext-sqlite-0"]
        where = await db._run(lambda conn: threading.current_thread())
        assert where is threading.current_thread()
    finally:
        await db.close()


async def test_transactions_handed_to_the_thread_run_in_order_and_skip_a_caller_that_stopped_waiting(
    tmp_path: pathlib.Path,
) -> None:
    """Once one transaction waits for the thread, the ones after it queue behind it rather than run
    on the loop ahead of it; they run in the order handed over; one that raises fails alone; a caller
    cancelled while its transaction still waits in the queue leaves it unrun; close() ends the thread."""
    path = tmp_path / "k.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.start()
    try:
        ran: list[str] = []

        def failing(conn: Connection) -> None:
            ran.append("failing")
            raise LookupError("no such thing")

        other = _write_lock(path)
        rid = _new_id()
        first = asyncio.ensure_future(db._run(lambda conn: ran.append("first") or "done"))
        broken = asyncio.ensure_future(db._run(failing))
        abandoned = asyncio.ensure_future(
            db.create_request(id=rid, endpoint="images.generate", model="m", mode="generate", params={})
        )
        last = asyncio.ensure_future(db._run(lambda conn: ran.append("last") or "after"))
        await asyncio.sleep(0)  # every one has handed its transaction over
        abandoned.cancel()
        other.execute("COMMIT")  # the first can begin now
        other.close()
        assert await first == "done"
        with pytest.raises(LookupError, match="no such thing"):
            await broken
        assert await last == "after"
        assert abandoned.cancelled()
        assert ran == ["first", "failing", "last"]
        assert await db.get_request(rid) is None  # the cancelled caller's row was never written
        assert db._sqlite_thread is not None
        (thread,) = db._sqlite_thread.threads
    finally:
        await db.close()
    assert not thread.is_alive()


async def test_the_thread_checkpoints_what_the_loops_connection_writes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's connection never checkpoints the WAL (a checkpoint syncs files to disk): every
    CHECKPOINT_EVERY commits the SQLite thread copies the WAL into the database file. Each row here
    is larger than SQLite's own automatic checkpoint threshold (1000 pages) over the first batch."""
    from kontext_gateway.store import sqlite_thread

    monkeypatch.setattr(sqlite_thread, "CHECKPOINT_EVERY", 5)
    path = tmp_path / "k.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.start()
    try:
        size = path.stat().st_size
        big = {"prompt": "x" * 1_100_000}  # ~270 pages each
        for _ in range(4):
            await db.create_request(id=_new_id(), endpoint="images.generate", model="m", mode="generate", params=big)
        assert db._sqlite_thread is not None and db._sqlite_thread.threads == ()
        assert path.stat().st_size == size  # 1,080 pages committed, none copied into the file by the loop
        await db.create_request(id=_new_id(), endpoint="images.generate", model="m", mode="generate", params=big)
        assert await await_until(lambda: path.stat().st_size > size + 5 * 1_000_000)  # the five rows are in it now
    finally:
        await db.close()


async def test_an_ending_appends_its_logs_to_those_already_written(db: Database) -> None:
    rid = _new_id()
    await db.create_request(id=rid, endpoint="predictions", model="m", mode="generate", params={})
    await db.append_log(rid, "attempt 1: bfl timed out\n")
    ended = await db.mark_failed(
        rid, error={"message": "x"}, attempts=[], duration_ms=5, logs="attempt 2: fal refused\n"
    )
    assert ended.logs == "attempt 1: bfl timed out\nattempt 2: fal refused\n"
    quiet = _new_id()
    await db.create_request(id=quiet, endpoint="predictions", model="m", mode="generate", params={})
    await db.append_log(quiet, "only line\n")
    done = await db.mark_succeeded(
        quiet,
        provider="bfl",
        cost=0.04,
        currency="USD",
        output_blob_ids=["b"],
        attempts=[],
        output_size="1024x1024",
        output_format="png",
        duration_ms=9,
    )
    assert (done.logs, done.status, done.output_blob_ids) == ("only line\n", "succeeded", ["b"])
    assert (await db.get_request(quiet)) == done


async def test_a_write_session_holds_the_write_lock_from_its_first_read(tmp_path: pathlib.Path) -> None:
    """On a SQLite file the job's transactions use a connection of their own. A session that reads and
    then writes must not let one of them commit in between: SQLite cannot then upgrade the session's
    read to a write ("database is locked", at once). A write session takes the lock at BEGIN, so the
    job's transaction waits for it instead."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    await db.start()
    try:
        first, racing_id = _new_id(), _new_id()
        await db.create_request(id=first, endpoint="images.generate", model="m", mode="generate", params={})
        async with db.session(write=True) as session, session.begin():
            await session.execute(select(RequestRecord.id))  # a read first
            racing = asyncio.ensure_future(
                db.create_request(id=racing_id, endpoint="images.generate", model="m", mode="generate", params={})
            )
            await asyncio.wait({racing}, timeout=2)  # it would commit within this without the lock
            assert not racing.done()
            await session.execute(update(RequestRecord).where(RequestRecord.id == first).values(logs="x"))
        await racing
        assert (await db.get_request(first)).logs == "x"  # type: ignore[union-attr]
        assert await db.get_request(racing_id) is not None
    finally:
        await db.close()


async def _journal(db: Database, tmp_path: pathlib.Path) -> tuple[str, DurableJournal]:
    rid = _new_id()
    await db.create_request(id=rid, endpoint="images.generate", model="m", mode="generate", params={})
    return rid, DurableJournal(db, LocalBlobStore(tmp_path / "blobs"), rid, [], max_pixels=10**6)


async def _states(db: Database, rid: str) -> list[tuple[str, str, list[str]]]:
    return [(t.task_id, t.state, t.output_blob_ids) for t in await db.tasks_for(rid)]


async def test_a_tasks_end_is_committed_with_the_jobs_ending(db: Database, tmp_path: pathlib.Path) -> None:
    """The usual job: one task ends and the job ends at once. The end is recorded in the job's ending
    transaction, and a run after a crash finds the task done with its stored image."""
    rid, journal = await _journal(db, tmp_path)
    row = await journal.submitted(0, "bfl/flux-kontext-pro", Task("t1", {"polling_url": "https://api.bfl.ai/x"}))
    await journal.finished(row, images=[ProviderImage(data=png_bytes(8, 6), format="png", size=Size(8, 6))])
    assert await _states(db, rid) == [("t1", "submitted", [])]  # not yet: it goes with the job's end
    ended = journal.take_unrecorded()
    assert [(e.row, e.state) for e in ended] == [(row, "done")] and journal.take_unrecorded() == []

    final = await db.mark_succeeded(
        rid,
        provider="bfl/flux-kontext-pro",
        cost=0.04,
        currency="USD",
        output_blob_ids=ended[0].output_blob_ids,
        attempts=[],
        output_size="8x6",
        output_format="png",
        duration_ms=5,
        ended_tasks=ended,
    )
    assert final.status == "succeeded"
    assert await _states(db, rid) == [("t1", "done", ended[0].output_blob_ids)]
    rerun = await DurableJournal.load(db, LocalBlobStore(tmp_path / "blobs"), rid, max_pixels=10**6)
    (image,) = await rerun.finished_images(0, "bfl/flux-kontext-pro") or []
    assert (image.format, image.size, image.data) == ("png", Size(8, 6), png_bytes(8, 6))


async def test_a_jobs_ending_that_fails_records_no_task_end(db: Database, tmp_path: pathlib.Path) -> None:
    """The ending and the task ends are one transaction: either both are recorded or neither is."""
    rid, journal = await _journal(db, tmp_path)
    row = await journal.submitted(0, "bfl/flux-kontext-pro", Task("t1"))
    await journal.finished(row, images=None)
    with pytest.raises(KeyError):
        await db.mark_failed(
            "req_missing", error={"message": "x"}, attempts=[], duration_ms=1, ended_tasks=journal.take_unrecorded()
        )
    assert await _states(db, rid) == [("t1", "submitted", [])]


async def test_a_tasks_end_is_recorded_at_once_while_another_task_is_upstream(
    db: Database, tmp_path: pathlib.Path
) -> None:
    """Several tasks of one job: an end is recorded at once while another task is still upstream (that
    wait may be long); the last one waits for the job's next write, here the next task's submit."""
    rid, journal = await _journal(db, tmp_path)
    first = await journal.submitted(0, "bfl/flux-kontext-pro", Task("t1"))
    second = await journal.submitted(1, "bfl/flux-kontext-pro", Task("t2"))
    await journal.finished(first, images=[ProviderImage(data=png_bytes(8, 6), format="png", size=Size(8, 6))])
    (done,) = [t for t in await db.tasks_for(rid) if t.task_id == "t1"]
    assert done.state == "done" and len(done.output_blob_ids) == 1
    await journal.finished(second, images=None)
    assert ("t2", "submitted", []) in await _states(db, rid)
    await journal.submitted(1, "fal/flux-kontext-pro", Task("t3"))  # failed over: the end goes with it
    assert await _states(db, rid) == [
        ("t1", "done", done.output_blob_ids),
        ("t2", "failed", []),
        ("t3", "submitted", []),
    ]
    assert journal.take_unrecorded() == []


async def test_unrecorded_task_ends_can_be_recorded_on_their_own(db: Database, tmp_path: pathlib.Path) -> None:
    """A job handed back without ending (a shutdown) records its tasks' ends first."""
    rid, journal = await _journal(db, tmp_path)
    row = await journal.submitted(0, "bfl/flux-kontext-pro", Task("t1"))
    await journal.finished(row, images=None)
    await journal.record_unrecorded()
    assert await _states(db, rid) == [("t1", "failed", [])]
    await journal.record_unrecorded()  # nothing left: nothing written
    assert journal.take_unrecorded() == []
