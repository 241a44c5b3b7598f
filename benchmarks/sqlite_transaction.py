"""What one of the job's SQLite transactions costs, by how it reaches the database: CPU-ms per transaction.

The transaction is the one that ends a request: UPDATE requests SET (12 columns) WHERE id = ... RETURNING
every column, then COMMIT, on a migrated database in a temp dir (WAL, synchronous=NORMAL, as the gateway
opens it). Nine ways, one at a time in this process (uvloop), `--n` transactions each, `--repeats`
rounds interleaved, medians:

  aiosqlite, built per call   the async engine (SQLAlchemy over aiosqlite): hops to aiosqlite's thread
                              for each cursor operation of each statement
  built per call              `Database._run`: the whole transaction through a blocking engine on the
                              sqlite3 module (on the loop, the file being free), the statement built
                              per call
  one hop, prebuilt, pooled   the statement built once (`UPDATE_REQUEST`), values as parameters, on
                              the SQLite thread's engine from an executor's thread, the connection
                              checked out of a pool of one per transaction (and reset with a ROLLBACK
                              when checked back in)
  one hop, prebuilt, executor the same on the connection the SQLite thread keeps, the hop made by
                              `loop.run_in_executor` (a one-thread executor)
  one hop, prebuilt           the same through `SQLiteThread`'s own hop (a queue it reads, the
                              caller's future settled from there): what the gateway does when
                              another connection holds the write lock
  on the loop, prebuilt       `Database._run` with the prebuilt statement, by `Connection.execute`
  on the loop, on the driver  the same statement as a `PreparedStatement`, run on the sqlite3 driver's
                              cursor with its column types' conversions: what the gateway runs
  sqlite3 alone, one hop      the same SQL through the sqlite3 module on an executor's thread
  sqlite3 alone, on the loop  the same on the loop (the floor)

Then a hosted job's writes through `Database` (CPU-ms per job, user and system apart: the Python work
is the user part, the WAL's writes at each commit most of the system part): its row created (already
claimed, as a request answered while it waits is), its upstream task recorded, then the task's end and
the job's end, either as two transactions (the task's end on its own, then the job's) or as one (the
task's end committed with the job's ending).

    .venv/bin/python benchmarks/sqlite_transaction.py
    PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/sqlite_transaction.py   # another checkout's src
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvloop
from sqlalchemy import Connection, update

if not os.environ.get("PYTHONPATH"):  # else the src it names (another checkout's) is the one measured
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kontext_gateway.store.db import REQUESTS, ROW_ID, UPDATE_REQUEST, Database
from kontext_gateway.store.engine import make_sqlite_thread_engine
from kontext_gateway.store.models import utcnow
from kontext_gateway.store.records import JobStatus, TaskEnd

PARAMS = {"prompt": "a red fox in the snow, golden hour, 35 mm photo", "aspect_ratio": "1:1", "output_format": "png"}


def ending() -> dict[str, Any]:
    return dict(
        status=JobStatus.SUCCEEDED,
        completed_at=utcnow(),
        provider="bfl",
        cost=0.04,
        currency="USD",
        output_blob_ids=["ab" * 32 + ".png"],
        attempts=[{"provider": "bfl", "ok": True, "ms": 12}],
        output_size="1024x1024",
        output_format="png",
        duration_ms=12,
        error=None,
        lease_until=None,
    )


async def run(n: int, repeats: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kontext-sqlite-bench-"))
    db = Database(f"sqlite+aiosqlite:///{tmp / 'kontext.db'}")
    await db.start()
    ids = [f"req_{uuid.uuid4().hex}" for _ in range(n)]
    for rid in ids:
        await db.create_request(id=rid, endpoint="images.generate", model="m", mode="generate", params={"p": 1})
    raw = sqlite3.connect(tmp / "kontext.db", isolation_level=None, check_same_thread=False)
    raw.execute("PRAGMA synchronous=NORMAL")
    raw_thread = ThreadPoolExecutor(1)
    pooled = make_sqlite_thread_engine(f"sqlite:///{tmp / 'kontext.db'}")
    loop = asyncio.get_running_loop()
    sqlite_thread = db._sqlite_thread
    assert sqlite_thread is not None, "a SQLite file has its thread"

    async def via_aiosqlite(rid: str) -> None:
        stmt = update(REQUESTS).where(REQUESTS.c.id == rid).values(**ending()).returning(*REQUESTS.c)
        async with db.engine.begin() as conn:
            (await conn.execute(stmt)).first()

    async def built(rid: str) -> None:
        stmt = update(REQUESTS).where(REQUESTS.c.id == rid).values(**ending()).returning(*REQUESTS.c)
        await db._run(lambda conn: conn.execute(stmt).first())

    core_update = getattr(UPDATE_REQUEST, "statement", UPDATE_REQUEST)  # a checkout from before PreparedStatement

    def prebuilt(rid: str) -> Callable[[Connection], Any]:
        params = {ROW_ID: rid, **ending()}
        return lambda conn: conn.execute(core_update, params).first()

    async def on_the_driver(rid: str) -> None:
        params = {ROW_ID: rid, **ending()}
        await db._run(lambda conn: UPDATE_REQUEST.first(conn, params))

    async def one_hop_prebuilt(rid: str) -> None:
        work = prebuilt(rid)
        await sqlite_thread._thread.call(lambda: sqlite_thread._transaction(work))

    async def on_the_loop(rid: str) -> None:
        await db._run(prebuilt(rid))

    async def one_hop_by_executor(rid: str) -> None:
        # The SQLite thread's kept connection, used from the executor's thread while nothing else runs.
        await loop.run_in_executor(raw_thread, sqlite_thread._transaction, prebuilt(rid))

    def pooled_transaction(rid: str) -> None:
        with pooled.begin() as conn:
            conn.execute(core_update, {ROW_ID: rid, **ending()}).first()

    async def one_hop_pooled(rid: str) -> None:
        await loop.run_in_executor(raw_thread, pooled_transaction, rid)

    def raw_transaction(rid: str) -> None:
        raw.execute("BEGIN")
        values = ("succeeded", "2026-01-01 00:00:00.000000", "bfl", 0.04, "USD", '["x"]', "[]", "1024x1024", "png")
        raw.execute(
            "UPDATE requests SET status=?, completed_at=?, provider=?, cost=?, currency=?, output_blob_ids=?,"
            " attempts=?, output_size=?, output_format=?, duration_ms=?, error=?, lease_until=? WHERE id=?"
            " RETURNING *",
            [*values, 12, None, None, rid],
        ).fetchone()
        raw.execute("COMMIT")

    async def sqlite3_alone(rid: str) -> None:
        await loop.run_in_executor(raw_thread, raw_transaction, rid)

    async def sqlite3_on_the_loop(rid: str) -> None:
        raw_transaction(rid)

    ways: dict[str, Callable[[str], Awaitable[None]]] = {
        "aiosqlite, built per call": via_aiosqlite,
        "built per call": built,
        "one hop, prebuilt, pooled": one_hop_pooled,
        "one hop, prebuilt, executor": one_hop_by_executor,
        "one hop, prebuilt": one_hop_prebuilt,
        "on the loop, prebuilt": on_the_loop,
    }
    if hasattr(UPDATE_REQUEST, "first"):  # not in a checkout from before PreparedStatement
        ways["on the loop, on the driver (the gateway)"] = on_the_driver
    ways["sqlite3 alone, one hop"] = sqlite3_alone
    ways["sqlite3 alone, on the loop"] = sqlite3_on_the_loop
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, way in ways.items():
            for rid in ids[:20]:  # warm the caches
                await way(rid)
            t0 = time.process_time()
            for rid in ids:
                await way(rid)
            cpu[name].append((time.process_time() - t0) / n * 1000)
    jobs = await job_writes(db, n, repeats)
    await db.close()
    raw.close()
    await loop.run_in_executor(raw_thread, pooled.dispose)
    raw_thread.shutdown()
    print(f"{n} transactions per way and round, {repeats} rounds, medians\n")
    print("| way | CPU-ms per transaction | rounds |")
    print("|---|---:|---|")
    for name, values in cpu.items():
        print(f"| {name} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    print(f"\nA hosted job's writes ({n} jobs per way and round; CPU-ms per job, user + system)\n")
    print("| way | user | system | rounds (user + system) |")
    print("|---|---:|---:|---|")
    for name, values in jobs.items():
        user, system = statistics.median(u for u, _ in values), statistics.median(s for _, s in values)
        rounds = ", ".join(f"{u:.2f} + {s:.2f}" for u, s in values)
        print(f"| {name} | {user:.3f} | {system:.3f} | {rounds} |")


async def job_writes(db: Database, n: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Per job, (user, system) CPU-ms: its row created, its task recorded, then the task's end and the
    job's end, as two transactions or as one."""

    async def job(rid: str, together: bool) -> None:
        await db.create_request(
            id=rid, endpoint="images.generations", model="m", mode="generate", params=PARAMS, claimed_by="w", lease_s=60
        )
        row = await db.record_task(rid, slot=0, config_key="bfl/flux-kontext-pro", task_id="t", data={"id": "t"})
        ended = [TaskEnd(row, "done", ["ab" * 32 + ".png"])]
        if not together:
            await db.finish_tasks(ended)
        end = ending()
        await db.mark_succeeded(
            rid,
            provider="bfl/flux-kontext-pro",
            cost=0.04,
            currency="USD",
            output_blob_ids=end["output_blob_ids"],
            attempts=end["attempts"],
            output_size="1024x1024",
            output_format="png",
            duration_ms=12,
            ledger=False,
            ended_tasks=ended if together else (),
        )

    ways = {"task's end on its own, then the job's": False, "task's end with the job's ending": True}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, together in ways.items():
            for _ in range(20):  # warm the caches
                await job(f"req_{uuid.uuid4().hex}", together)
            ids = [f"req_{uuid.uuid4().hex}" for _ in range(n)]
            t0 = os.times()
            for rid in ids:
                await job(rid, together)
            t1 = os.times()
            cpu[name].append(((t1.user - t0.user) / n * 1000, (t1.system - t0.system) / n * 1000))
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="transactions per way and round (default 500)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds, interleaved (default 5)")
    args = ap.parse_args()
    uvloop.run(run(args.n, args.repeats))


if __name__ == "__main__":
    main()
