"""The job's hot statements on SQLite's driver: the same rows as `Connection.execute` writes and reads,
SQLAlchemy's errors, and `execute` itself wherever the driver path would not be the same."""

from __future__ import annotations

import pathlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, insert
from sqlalchemy.exc import IntegrityError, InvalidRequestError, StatementError

from kontext_gateway.store.db import (
    INSERT_REQUEST,
    INSERT_TASK,
    ROW_ID,
    SELECT_REQUEST,
    TASKS,
    UPDATE_REQUEST,
    UPDATE_REQUEST_WITH_LOGS,
    UPDATE_TASK,
    Database,
)
from kontext_gateway.store.engine import make_sqlite_thread_engine
from kontext_gateway.store.prepared import PreparedStatement
from kontext_gateway.store.records import JobStatus, Lane, RequestRow


@pytest.fixture
async def sqlite_file(tmp_path: pathlib.Path) -> AsyncIterator[pathlib.Path]:
    """A migrated SQLite file, as the gateway leaves it."""
    path = tmp_path / "kontext.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.start()
    await db.close()
    yield path


@pytest.fixture
def executed() -> list[str]:
    """The statements that went through SQLAlchemy's execution (its cursor events), not straight to the
    driver, on `engine`."""
    return []


@pytest.fixture
def engine(sqlite_file: pathlib.Path, executed: list[str]) -> Iterator[Engine]:
    """A blocking engine on the sqlite3 module, as the job's transactions use."""
    made = make_sqlite_thread_engine(f"sqlite:///{sqlite_file}")

    @event.listens_for(made, "before_cursor_execute")
    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        executed.append(statement)

    yield made
    made.dispose()


def request_values(rid: str, **changes: Any) -> dict[str, Any]:
    """Every column, with each kind of value the table holds: JSON objects, lists and null, aware
    datetimes (and none), a boolean, a float, text with a quote."""
    now = datetime(2026, 12, 6, 3, 4, 5, 678901, tzinfo=UTC)
    values: dict[str, Any] = dict(
        id=rid,
        created_at=now,
        started_at=now + timedelta(seconds=1),
        completed_at=None,
        key_id="key_1",
        endpoint="images.generations",
        model="flux-kontext-pro",
        provider=None,
        mode="text-to-image",
        params={"prompt": 'it\'s a "cat" — ünïcode', "seed": 42, "nested": {"a": [1, 2.5, None, True]}},
        status=JobStatus.PROCESSING,
        duration_ms=None,
        cost=0.04,
        currency="USD",
        output_blob_ids=[],
        attempts=[{"provider": "bfl", "ok": True}],
        error=None,
        output_size=None,
        output_format=None,
        input={"image": "blob:ab.png"},
        version=None,
        logs="",
        webhook="https://example.com/hook",
        webhook_events=["completed"],
        cancel_requested=True,
        claimed_by="worker-1",
        lease_until=now + timedelta(minutes=5),
        runs=1,
        purged_at=None,
        lane=Lane.HOSTED,
    )
    return values | changes


def ending(rid: str) -> dict[str, Any]:
    return {
        ROW_ID: rid,
        "status": JobStatus.SUCCEEDED,
        "completed_at": datetime(2026, 12, 6, 3, 4, 9, tzinfo=UTC),  # no microseconds: stored with them all the same
        "output_blob_ids": ["ab" * 32 + ".jpg"],
        "error": None,
        "lease_until": None,
        "duration_ms": 4000,
    }


def stored(path: pathlib.Path, table: str, where: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows as the file holds them, read by the sqlite3 module alone: what either path wrote."""
    with sqlite3.connect(path) as raw:
        return raw.execute(f"SELECT * FROM {table} WHERE {where}", args).fetchall()


def test_rows_written_and_read_on_the_driver_are_those_execute_writes_and_reads(
    engine: Engine, executed: list[str], sqlite_file: pathlib.Path
) -> None:
    by_execute, on_driver = "req_execute", "req_driver"
    with engine.begin() as conn:
        conn.execute(INSERT_REQUEST.statement, request_values(by_execute))
        ended_by_execute = conn.execute(UPDATE_REQUEST.statement, ending(by_execute)).first()
    assert len(executed) == 2
    with engine.begin() as conn:
        INSERT_REQUEST.execute(conn, request_values(on_driver))
        ended_on_driver = UPDATE_REQUEST.first(conn, ending(on_driver))
        read_on_driver = SELECT_REQUEST.first(conn, {ROW_ID: on_driver})
    assert len(executed) == 2, "the prepared statements went through SQLAlchemy's execution"

    [file_by_execute] = stored(sqlite_file, "requests", "id = ?", by_execute)
    [file_on_driver] = stored(sqlite_file, "requests", "id = ?", on_driver)
    assert file_on_driver[1:] == file_by_execute[1:]  # the same text, numbers and nulls in the file
    assert file_on_driver[1] == "2026-12-06 03:04:05.678901"  # SQLAlchemy's datetime text, UTC

    assert ended_on_driver is not None and ended_by_execute is not None
    expected = RequestRow.from_row(ended_by_execute, id=on_driver)
    assert RequestRow.from_row(ended_on_driver) == expected
    assert RequestRow.from_row(read_on_driver) == expected
    assert expected.completed_at == datetime(2026, 12, 6, 3, 4, 9, tzinfo=UTC)
    assert expected.params["prompt"] == 'it\'s a "cat" — ünïcode' and expected.cancel_requested is True


def test_an_update_with_a_column_expression_and_several_rows_at_once(
    engine: Engine, executed: list[str], sqlite_file: pathlib.Path
) -> None:
    rid = "req_1"
    with engine.begin() as conn:
        INSERT_REQUEST.execute(conn, request_values(rid, logs="first\n"))
        row = UPDATE_REQUEST_WITH_LOGS.first(conn, {ROW_ID: rid, "more_logs": "second\n", "runs": 2})
        tasks = [
            INSERT_TASK.scalar_one(
                conn,
                dict(
                    request_id=rid,
                    slot=slot,
                    config_key="bfl/flux-kontext-pro",
                    task_id=f"t{slot}",
                    data={"id": f"t{slot}"},
                    state="submitted",
                    output_blob_ids=[],
                    created_at=datetime.now(UTC),
                    updated_at=datetime.now(UTC),
                ),
            )
            for slot in range(2)
        ]
        now = datetime.now(UTC)
        UPDATE_TASK.execute(
            conn,
            [{ROW_ID: t, "state": "done", "output_blob_ids": [f"{t}.png"], "updated_at": now} for t in tasks],
        )
    assert executed == []
    assert row.logs == "first\nsecond\n" and row.runs == 2
    assert sorted(tasks) == tasks and len(set(tasks)) == 2  # the new rows' ids, as RETURNING gave them
    states = stored(sqlite_file, "upstream_tasks", "request_id = ? ORDER BY id", rid)
    assert [(r[0], r[6], r[7]) for r in states] == [(t, "done", f'["{t}.png"]') for t in tasks]


def test_no_row(engine: Engine) -> None:
    with engine.begin() as conn:
        assert SELECT_REQUEST.first(conn, {ROW_ID: "req_none"}) is None
        assert UPDATE_REQUEST.first(conn, ending("req_none")) is None


def test_driver_errors_are_sqlalchemys_without_the_parameters(engine: Engine, sqlite_file: pathlib.Path) -> None:
    secret = f"prompt-{uuid.uuid4().hex}"
    with engine.begin() as conn:
        INSERT_REQUEST.execute(conn, request_values("req_1", params={"prompt": secret}))
    with pytest.raises(IntegrityError) as raised, engine.begin() as conn:
        INSERT_REQUEST.execute(conn, request_values("req_1", params={"prompt": secret}))
    assert isinstance(raised.value.orig, sqlite3.IntegrityError)
    assert "UNIQUE constraint failed: requests.id" in str(raised.value)
    assert "INSERT INTO requests" in str(raised.value) and secret not in str(raised.value)

    naive = datetime(2026, 1, 1)
    with pytest.raises(StatementError, match="naive datetime") as refused, engine.begin() as conn:
        INSERT_REQUEST.execute(conn, request_values("req_2", created_at=naive))
    assert isinstance(refused.value.orig, ValueError)

    required = "A value is required for bind parameter 'row_id'"
    with pytest.raises(StatementError, match=required) as missing, engine.begin() as conn:
        UPDATE_REQUEST.first(conn, {"status": JobStatus.FAILED})
    assert isinstance(missing.value.orig, InvalidRequestError)
    assert [r[0] for r in stored(sqlite_file, "requests", "1")] == ["req_1"]  # nothing of the failed ones stayed


def test_python_side_defaults_are_left_to_execute(
    engine: Engine, executed: list[str], sqlite_file: pathlib.Path
) -> None:
    """A column default computed in Python (the task's timestamps and blob list) needs SQLAlchemy's
    execution context: that statement goes through `execute`, and the defaults are filled."""
    with engine.begin() as conn:
        INSERT_REQUEST.execute(conn, request_values("req_1"))
        task = INSERT_TASK.scalar_one(
            conn, dict(request_id="req_1", slot=0, config_key="k", task_id="t", data={}, state="submitted")
        )
    assert len(executed) == 1
    [row] = stored(sqlite_file, "upstream_tasks", "id = ?", task)
    assert row[7] == "[]" and row[8].startswith(str(datetime.now(UTC).year)) and row[9] >= row[8]


async def test_other_connections_run_the_statements_with_execute() -> None:
    """On the async engine's connection (aiosqlite here, asyncpg on PostgreSQL) the driver path does not
    apply: the same calls give the same results through `execute`."""
    db = Database("sqlite+aiosqlite://")  # in memory: the async engine runs the job's transactions
    await db.start()
    executed: list[str] = []
    event.listen(db.engine.sync_engine, "before_cursor_execute", lambda *a: executed.append(a[2]))
    try:
        rid = "req_1"

        def work(conn: Connection) -> Any:
            INSERT_REQUEST.execute(conn, request_values(rid))
            return UPDATE_REQUEST.first(conn, ending(rid))

        row = await db._run(work)
        assert [s.split()[0] for s in executed] == ["INSERT", "UPDATE"]
        assert RequestRow.from_row(row).status == JobStatus.SUCCEEDED
        assert (await db.get_request(rid)) == RequestRow.from_row(row)
    finally:
        await db.close()


def test_a_statement_is_compiled_once_per_set_of_parameter_names(engine: Engine) -> None:
    statement = PreparedStatement(insert(TASKS).returning(TASKS.c.id))
    compiled: list[str] = []
    event.listen(engine, "before_execute", lambda *a: compiled.append("execute"))
    now = datetime.now(UTC)
    with engine.begin() as conn:
        INSERT_REQUEST.execute(conn, request_values("req_1"))
        for slot in range(3):
            values = dict(request_id="req_1", slot=slot, config_key="k", task_id=f"t{slot}", data={}, state="submitted")
            statement.scalar_one(conn, values | {"output_blob_ids": [], "created_at": now, "updated_at": now})
    assert compiled == []
    by_dialect = list(statement._compiled.values())
    assert len(by_dialect) == 1 and len(by_dialect[0]) == 1
