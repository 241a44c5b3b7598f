"""How long a prediction waits for a worker in another process: created (API) to claimed (worker), on
PostgreSQL or on the SQLite file both processes share (`--database sqlite`).

An API process (`kontext serve --workers 0`) enqueues; one `kontext worker` process (`--concurrency` the
crowd's size, 8 at least), otherwise idle, claims. Predictions arrive one at a time, each after a random
pause (uniform in `--gap` seconds), so every one finds the worker waiting and lands at a random moment
of its poll cycle. The fake Replicate (tests/fakes/replicate.py, `pending_polls=0`, as in
predictions_throughput.py) answers at once. From the rows: claimed = `started_at` - `created_at` (the
two processes' clocks are this machine's one), done = `completed_at` - `created_at`; p50 / p90 / max
over `--jobs`. Then `--waits` more, each with `Prefer: wait` (the API process waits for the worker's end
and answers `succeeded`): the client's whole request, timed by the client. Then a crowd: `--crowd`
predictions with `Prefer: wait` at once, each pending upstream for `--crowd-polls` polls (some 5 s), and
the CPU the API process spent while they waited (its waiters' reads of the jobs, and whatever tells it
of their ends). Last, each process's CPU while nothing happens (`--idle` seconds). `--src DIR` runs the
API and the worker from another checkout's src (before / after).

    .venv/bin/python benchmarks/claim_latency.py
    .venv/bin/python benchmarks/claim_latency.py --jobs 200 --src /tmp/before/src
    .venv/bin/python benchmarks/claim_latency.py --database sqlite    # the data dir's kontext.db
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from common import cpu_seconds, free_port, machine, percentile, server_command, stop_process
from predictions_throughput import FAKE_CODE, MODEL, PG_SERVER, ROOT, TOKEN, _admin, _wait_http


async def send(
    api_url: str, n: int, gap: tuple[float, float], seed: int, *, wait: bool = False
) -> list[tuple[str, float]]:
    """`n` predictions one at a time, each after a random pause: (id, ms from sending to the answer).
    With `wait`, `Prefer: wait`: the answer comes once the worker has ended it (checked `succeeded`)."""
    rng = random.Random(seed)
    sent = []
    headers = {"Prefer": "wait=30"} if wait else {}
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as client:
        for i in range(n):
            await asyncio.sleep(rng.uniform(*gap))
            t0 = time.perf_counter()
            r = await client.post(
                f"/v1/models/{MODEL}/predictions",
                json={"input": {"prompt": f"{'wait' if wait else 'job'} {i}"}},
                headers=headers,
            )
            took = 1000 * (time.perf_counter() - t0)
            if r.status_code >= 300 or (wait and r.json().get("status") != "succeeded"):
                raise SystemExit(f"the create answered {r.status_code}: {r.text[:300]}")
            sent.append((r.json()["id"], took))
    return sent


async def rows(dsn: str, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    """The predictions' rows once every one has ended: a PostgreSQL DSN, or a SQLite file's path."""
    deadline = time.monotonic() + timeout
    while True:
        postgres = dsn.startswith("postgresql")
        found = await (_pg_rows(dsn, ids) if postgres else asyncio.to_thread(_sqlite_rows, dsn, ids))
        if len(found) == len(ids) and all(r["completed_at"] is not None for r in found):
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"not every prediction ended within {timeout:g} s")
        await asyncio.sleep(0.2)


async def _pg_rows(dsn: str, ids: list[str]) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        query = "SELECT id, status, created_at, started_at, completed_at FROM requests WHERE id = ANY($1)"
        return [dict(r) for r in await conn.fetch(query, ids)]
    finally:
        await conn.close()


def _sqlite_rows(path: str, ids: list[str]) -> list[dict[str, Any]]:
    names = ("id", "status", "created_at", "started_at", "completed_at")
    query = f"SELECT {', '.join(names)} FROM requests WHERE id IN ({', '.join('?' * len(ids))})"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        found = conn.execute(query, ids).fetchall()
    # SQLAlchemy keeps SQLite's datetimes as ISO text
    return [
        {n: datetime.fromisoformat(v) if n.endswith("_at") and v else v for n, v in zip(names, r, strict=True)}
        for r in found
    ]


async def crowd(api_url: str, fake_url: str, n: int, polls: int) -> list[float]:
    """`n` predictions with `Prefer: wait` at once, each pending upstream for `polls` polls: the seconds
    each request took (all checked `succeeded`)."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as client:
        (await client.post(f"{fake_url}/_bench/pending", params={"polls": polls})).raise_for_status()

        async def one(i: int) -> float:
            t0 = time.perf_counter()
            r = await client.post(
                f"{api_url}/v1/models/{MODEL}/predictions",
                json={"input": {"prompt": f"crowd {i}"}},
                headers={"Prefer": "wait=60"},
            )
            if r.status_code >= 300 or r.json().get("status") != "succeeded":
                raise SystemExit(f"crowd prediction {i}: {r.status_code} {r.text[:300]}")
            return time.perf_counter() - t0

        try:
            return list(await asyncio.gather(*(one(i) for i in range(n))))
        finally:
            await client.post(f"{fake_url}/_bench/pending", params={"polls": 0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100, help="predictions, one at a time (default 100)")
    ap.add_argument("--waits", type=int, default=50, help="then predictions with Prefer: wait (default 50)")
    ap.add_argument("--gap", type=float, nargs=2, default=(0.05, 0.6), help="pause before each, s (default 0.05 0.6)")
    ap.add_argument("--src", type=Path, default=None, help="run the API and the worker from this src directory")
    ap.add_argument(
        "--database",
        choices=("postgresql", "sqlite"),
        default="postgresql",
        help="PostgreSQL (a throwaway database on --pg-server), or the data dir's SQLite file (default postgresql)",
    )
    ap.add_argument("--pg-server", default=PG_SERVER, help=f"PostgreSQL server URL (default {PG_SERVER})")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of nothing, for the idle CPU (default 10)")
    ap.add_argument("--crowd", type=int, default=128, help="then this many waiting at once (default 128)")
    ap.add_argument("--crowd-polls", type=int, default=10, help="each pending for N polls (default 10)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    print(f"machine: {machine()}\nsrc: {args.src or ROOT / 'src'}\ndatabase: {args.database}", flush=True)

    data_dir = Path(tempfile.mkdtemp(prefix="kontext-claimbench-"))
    pg_name = f"kontext_claim_{uuid.uuid4().hex[:10]}" if args.database == "postgresql" else None
    if pg_name is not None:
        asyncio.run(_admin(args.pg_server, f'CREATE DATABASE "{pg_name}"'))
    dsn = f"{args.pg_server}/{pg_name}" if pg_name is not None else str(data_dir / "kontext.db")
    fake_port, api_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KONTEXT_") and k != "DATABASE_URL"}
    if pg_name is not None:
        env["DATABASE_URL"] = dsn  # else both processes take the data dir's SQLite file
    env.update(
        REPLICATE_API_TOKEN=TOKEN,
        REPLICATE_BASE_URL=f"http://127.0.0.1:{fake_port}",
        KONTEXT_DATA_DIR=str(data_dir),
    )
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve())
    fake_env = {**env, "PYTHONPATH": str(ROOT / "tests")}
    procs: list[subprocess.Popen] = []
    log = None
    try:
        log = open(data_dir / "processes.log", "wb")
        fake = subprocess.Popen(
            [sys.executable, "-c", FAKE_CODE, str(fake_port), TOKEN, "0.25"], env=fake_env, stdout=log, stderr=log
        )
        procs.append(fake)
        _wait_http(fake, fake_port, "/results/none.png", 404, "the fake Replicate", data_dir / "processes.log")
        api = subprocess.Popen(
            [*server_command(api_port, str(data_dir)), "--workers", "0"], env=env, stdout=log, stderr=log
        )
        procs.append(api)
        _wait_http(api, api_port, "/health", 200, "kontext serve", data_dir / "processes.log")
        script = Path(sys.executable).with_name("kontext")
        base = [str(script)] if script.exists() else [sys.executable, "-m", "kontext_gateway"]
        worker_cmd = [*base, "worker", "--concurrency", str(max(8, args.crowd)), "--data-dir", str(data_dir)]
        worker = subprocess.Popen(worker_cmd, env=env, stdout=log, stderr=log)
        procs.append(worker)
        api_url = f"http://127.0.0.1:{api_port}"
        # One prediction first: the worker is up, connected and claiming before anything is timed.
        first = asyncio.run(send(api_url, 1, (0.0, 0.0), args.seed))
        asyncio.run(rows(dsn, [rid for rid, _ in first], 120))
        # Idle: what each process costs while nothing happens (its polls and watches).
        idle = {name: cpu_seconds(p.pid) for name, p in (("API", api), ("worker", worker))}
        time.sleep(args.idle)
        idle = {name: (cpu_seconds(p.pid) - idle[name]) / args.idle for name, p in (("API", api), ("worker", worker))}
        ids = [rid for rid, _ in asyncio.run(send(api_url, args.jobs, tuple(args.gap), args.seed))]
        found = asyncio.run(rows(dsn, ids, 120))
        waited = asyncio.run(send(api_url, args.waits, tuple(args.gap), args.seed, wait=True)) if args.waits else []
        took = sorted(ms for _, ms in waited)
        # A crowd waiting at once in the API process for jobs the worker runs: what the waits cost it.
        api_cpu = cpu_seconds(api.pid)
        crowd_s = asyncio.run(crowd(api_url, f"http://127.0.0.1:{fake_port}", args.crowd, args.crowd_polls))
        api_cpu = cpu_seconds(api.pid) - api_cpu
    finally:
        for p in reversed(procs):
            stop_process(p)
        if log is not None:
            log.close()
        if pg_name is not None:
            asyncio.run(_admin(args.pg_server, f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))
        shutil.rmtree(data_dir, ignore_errors=True)

    statuses = {r["status"] for r in found}
    claimed = sorted(1000 * (r["started_at"] - r["created_at"]).total_seconds() for r in found)
    done = sorted(1000 * (r["completed_at"] - r["created_at"]).total_seconds() for r in found)
    print(f"\n{len(found)} predictions, one at a time, {args.gap[0]:g}-{args.gap[1]:g} s apart; statuses {statuses}\n")
    print("| ms | p50 | p90 | max |\n|---|---:|---:|---:|")
    for name, values in (("created -> claimed", claimed), ("created -> completed", done)):
        print(f"| {name} | {percentile(values, 50):.1f} | {percentile(values, 90):.1f} | {values[-1]:.1f} |")
    if took:
        name = f"Prefer: wait, the whole request ({len(took)})"
        print(f"| {name} | {percentile(took, 50):.1f} | {percentile(took, 90):.1f} | {took[-1]:.1f} |")
    if crowd_s:
        print(
            f"\ncrowd: {len(crowd_s)} Prefer: wait predictions at once, each pending for {args.crowd_polls} polls "
            f"(each request {statistics.median(crowd_s):.2f} s, median): the API process spent {api_cpu:.2f} CPU-s, "
            f"{1000 * api_cpu / len(crowd_s):.1f} CPU-ms per request"
        )
    print(f"\nidle, over {args.idle:g} s: " + ", ".join(f"{n} {1000 * c:.1f} CPU-ms a second" for n, c in idle.items()))


if __name__ == "__main__":
    main()
