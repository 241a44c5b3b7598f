"""Prediction throughput: how fast predictions are created through the API, and how fast workers finish them.

For each configuration (default: SQLite with 1 worker process, PostgreSQL with 1, PostgreSQL with 3):

  1. a fresh database (SQLite: kontext.db in a fresh temp data dir; PostgreSQL: a throwaway database
     `kontext_bench_<hex>`, dropped afterwards), a fresh fake Replicate (tests/fakes/replicate.py,
     `pending_polls=0`: the gateway's `Prefer: wait` create call returns the finished prediction) as its
     own uvicorn process, and `kontext serve --workers 0` (API only, no claim loops) on that database;
  2. **created/s**: N predictions, `POST /v1/models/replicate/flux.1-kontext-pro/predictions`
     `{"input": {"prompt": "job i"}}` (no `Prefer: wait`: each answers 201 `starting` once its job row
     is committed), from `--clients` concurrent httpx clients (one AsyncClient with one keep-alive
     connection each). Timed from the first request sent to the last 201. No worker runs yet, so this is
     creation alone;
  3. **completed/s**: then the configuration's `kontext worker --concurrency C` processes start on the
     same database. Timed from their spawn until every prediction is `succeeded` (the benchmark polls one
     count query every `--poll` s; the timestamps come from the rows: max(completed_at) - spawn).
     The worker start-up (imports, engine, migrations check; the first claim) is inside that window, so
     the table also gives the time to the first claim and to the first completion, and the steady
     rate (N-1) / (last completed_at - first completed_at);
  4. checks: every prediction succeeded, each ran once (`runs == 1`), the fake saw exactly one submit
     per prompt and N downloads, and which worker ran how many.

CPU is read from /proc for the API server, each worker and the fake, and from getrusage for this process
(the HTTP client, then the polling), over each phase: % of one core and CPU-ms per prediction. Worker
CPU per job "steady" leaves out start-up: it is the workers' CPU between the first poll that saw a
completion and the last, divided by the completions in between. All processes share the machine's
cores; "machine busy" is all of them from /proc/stat (200 % = 2 cores busy). The local PostgreSQL server
is not a child of this script: its CPU is summed over its processes in /proc (live backends, plus
what the postmaster reaped from exited ones), and "PG connections opened" is the change in
pg_stat_database.sessions for the benchmark's database over the phase (approximate: a live backend
reports at most once a second; the count after creation is read 1.2 s after the last 201).

Uses gateway internals only to read the `requests` table (SQLAlchemy on the gateway's engine).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

from common import (
    CpuWatch,
    _machine_busy,
    cpu_seconds,
    free_port,
    http_get,
    machine,
    percentile,
    rss_mb,
    server_command,
    stop_process,
)
from common import _own_cpu as _own_and_children_cpu

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "r8_test"
MODEL = "replicate/flux.1-kontext-pro"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"  # --pg-server; the admin connection uses its `postgres` db

FAKE_CODE = """
import collections, sys, uvicorn
from starlette.responses import JSONResponse
from starlette.routing import Route
from fakes.common import ResultStore
from fakes.replicate import FakeReplicate
fake = FakeReplicate(token=sys.argv[2], pending_polls=0, results=ResultStore(scale=float(sys.argv[3])))
async def stats(request):
    prompts = collections.Counter(str((body or {}).get("input", {}).get("prompt")) for _, _, _, body in fake.submits())
    downloads = sum(1 for method, path, _, _ in fake.requests if method == "GET" and path.startswith("/results/")
                and path != "/results/none.png")  # not the benchmark's start-up probe
    return JSONResponse({"prompts": prompts, "downloads": downloads, "requests": len(fake.requests)})
async def pending(request):  # from now on, each new prediction is pending for this many polls
    fake.pending_polls = int(request.query_params["polls"])
    return JSONResponse({"pending_polls": fake.pending_polls})
fake.app.router.routes.append(Route("/_bench/stats", stats))
fake.app.router.routes.append(Route("/_bench/pending", pending, methods=["POST"]))
uvicorn.run(fake.app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def _own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def postgres_cpu() -> float:
    """CPU seconds of the local PostgreSQL server: its live processes (comm `postgres`), plus what its
    postmaster has reaped from exited backends (cutime + cstime). 0 when none runs here or /proc hides it."""
    hz, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
        except OSError:
            continue
        if head.split("(", 1)[1] != "postgres":
            continue
        fields = tail.split()
        total += int(fields[11]) + int(fields[12])
        try:
            with open(f"/proc/{fields[1]}/stat") as f:
                parent_is_pg = f.read().split("(", 1)[1].rsplit(")", 1)[0] == "postgres"
        except OSError:
            parent_is_pg = False
        if not parent_is_pg:  # the postmaster: add its reaped children
            total += int(fields[13]) + int(fields[14])
    return total / hz


def _wait_http(
    proc: subprocess.Popen, port: int, path: str, status: int, what: str, log: Path, timeout: float = 60.0
) -> float:
    t0 = time.perf_counter()
    while True:
        try:
            if http_get(port, path, timeout=1.0)[0] == status:
                return time.perf_counter() - t0
        except OSError:
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{what} did not start; log: {log}")
        time.sleep(0.01)


async def pg_sessions(server: str, database: str | None) -> int | None:
    """Connections opened to `database` so far (pg_stat_database.sessions, PostgreSQL 14+). A backend
    reports its stats at exit or at most once a second, so a count may lag by the live connections."""
    if database is None:
        return None
    import asyncpg

    conn = await asyncpg.connect(f"{server}/postgres", timeout=5)
    try:
        return await conn.fetchval("SELECT sessions FROM pg_stat_database WHERE datname = $1", database)
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()


async def _admin(server: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"{server}/postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# -- phase 1: create N predictions through the API ----------------------------------------------------------


async def create_all(api_url: str, n: int, clients: int, pids: dict[str, int]) -> dict:
    url = f"{api_url}/v1/models/{MODEL}/predictions"
    todo = iter(range(n))
    ids: list[str] = []
    latencies: list[float] = []
    errors: list[str] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in todo:
            t0 = time.perf_counter()
            r = await client.post(url, json={"input": {"prompt": f"job {i}"}})
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 201 or r.json().get("status") != "starting":
                errors.append(f"{r.status_code} {r.text[:200]}")
                continue
            ids.append(r.json()["id"])

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    pool = [httpx.AsyncClient(limits=limits, timeout=60.0) for _ in range(clients)]
    try:
        # Open each client's connection (GET /health) so that the timed window holds only the creates.
        await asyncio.gather(*(c.get(f"{api_url}/health") for c in pool))
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        own0, busy0, rss0, pg0 = _own_cpu(), _machine_busy()[0], rss_mb(pids["api"]), postgres_cpu()
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in pool))
        elapsed = time.perf_counter() - t0
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        cpu["client"] = _own_cpu() - own0
        cpu["postgres"] = postgres_cpu() - pg0
        busy = _machine_busy()[0] - busy0
        rss1 = rss_mb(pids["api"])
    finally:
        for c in pool:
            await c.aclose()
    ms = sorted(x * 1000 for x in latencies)
    return {
        "ids": ids,
        "errors": errors,
        "elapsed": elapsed,
        "rate": len(ids) / elapsed,
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "cpu": cpu,
        "busy": busy,
        "rss": (rss0, rss1),
    }


# -- phase 2: start the workers, wait until every prediction has succeeded ------------------------------------


async def run_workers(db, n: int, start_workers, pids: dict[str, int], poll: float, timeout: float) -> dict:
    from sqlalchemy import func, select

    from kontext_gateway.store.models import RequestRecord

    count = select(RequestRecord.status, func.count()).group_by(RequestRecord.status)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    own0, busy0, pg0 = _own_cpu(), _machine_busy()[0], postgres_cpu()
    spawn_utc, t0 = datetime.now(UTC), time.perf_counter()
    workers = start_workers()
    worker_cpu = [0.0] * len(workers)
    samples: list[tuple[int, float]] = []  # (succeeded so far, all workers' CPU) at each poll
    counts: dict[str, int] = {}
    try:
        while True:
            async with db.engine.connect() as conn:
                counts = dict((await conn.execute(count)).all())
            for i, w in enumerate(workers):
                if w.poll() is None:
                    worker_cpu[i] = cpu_seconds(w.pid)
            samples.append((counts.get("succeeded", 0), sum(worker_cpu)))
            if counts.get("succeeded", 0) + counts.get("failed", 0) + counts.get("canceled", 0) >= n:
                break
            if any(w.poll() is not None for w in workers):
                raise RuntimeError(f"a worker exited (rc {[w.poll() for w in workers]}); counts {counts}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"not done after {timeout:g} s: {counts}")
            await asyncio.sleep(poll)
        polled = time.perf_counter() - t0
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        cpu.update({f"worker {i + 1}": c for i, c in enumerate(worker_cpu)})
        cpu["client"] = _own_cpu() - own0
        cpu["postgres"] = postgres_cpu() - pg0
        busy = _machine_busy()[0] - busy0
    finally:
        for w in workers:
            stop_process(w)
    first = next(((k, c) for k, c in samples if k > 0), None)
    last = samples[-1]
    steady = (
        1000 * (last[1] - first[1]) / (last[0] - first[0]) if first is not None and last[0] > first[0] else float("nan")
    )
    return {
        "spawn_utc": spawn_utc,
        "polled": polled,
        "cpu": cpu,
        "busy": busy,
        "counts": counts,
        "worker_ms_steady": steady,
    }


async def phase_all(
    args: argparse.Namespace,
    backend: str,
    nworkers: int,
    data_dir: Path,
    env: dict[str, str],
    api_url: str,
    pids: dict[str, int],
    fake_url: str,
    logs: list[Path],
) -> dict:
    from sqlalchemy import select

    from kontext_gateway.config import Settings
    from kontext_gateway.store.db import Database
    from kontext_gateway.store.models import RequestRecord

    pg_name = env.get("DATABASE_URL", "").rsplit("/", 1)[-1] if backend == "pg" else None
    sessions0 = await pg_sessions(args.pg_server, pg_name)
    created = await create_all(api_url, args.jobs, args.clients, pids)
    await asyncio.sleep(1.2 if pg_name else 0)  # let the API's live backends report their stats
    sessions1 = await pg_sessions(args.pg_server, pg_name)
    if created["errors"]:
        raise RuntimeError(f"{len(created['errors'])} creates failed, e.g. {created['errors'][0]}")
    print(f"  created {len(created['ids'])} in {created['elapsed']:.2f} s ({created['rate']:.1f}/s)", flush=True)

    def start_workers() -> list[subprocess.Popen]:
        procs = []
        for i in range(nworkers):
            log = data_dir / f"worker-{i + 1}.log"
            logs.append(log)
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "kontext_gateway",
                            "worker",
                            "--concurrency",
                            str(args.concurrency),
                            "--data-dir",
                            str(data_dir),
                        ],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=out,
                    )
                )
        return procs

    url = env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'kontext.db'}"
    db = Database(Settings(data_dir=data_dir, database_url=url).resolved_database_url())
    await db.start()
    try:
        done = await run_workers(db, args.jobs, start_workers, pids, args.poll, args.timeout)
        cols = (
            RequestRecord.id,
            RequestRecord.status,
            RequestRecord.runs,
            RequestRecord.claimed_by,
            RequestRecord.created_at,
            RequestRecord.started_at,
            RequestRecord.completed_at,
        )
        async with db.engine.connect() as conn:
            rows = (await conn.execute(select(*cols))).all()
    finally:
        await db.close()
    async with httpx.AsyncClient(timeout=60.0) as client:
        stats = (await client.get(f"{fake_url}/_bench/stats")).json()
    sessions2 = await pg_sessions(args.pg_server, pg_name)  # the workers have exited: their backends have reported
    if sessions0 is not None and sessions1 is not None and sessions2 is not None:
        created["sessions"], done["sessions"] = sessions1 - sessions0, sessions2 - sessions1
    print(f"  completed in {done['polled']:.2f} s (polled)", flush=True)
    return {"created": created, "done": done, "rows": rows, "fake": stats}


def summarise(name: str, n: int, nworkers: int, r: dict) -> dict:
    created, done, rows, fake = r["created"], r["done"], r["rows"], r["fake"]
    spawn = done["spawn_utc"]
    by_id = {row.id: row for row in rows}
    ours = [by_id.get(i) for i in created["ids"]]
    succeeded = [row for row in ours if row is not None and row.status == "succeeded"]
    completed = sorted(row.completed_at for row in succeeded)
    claimed = sorted(row.started_at for row in succeeded)
    total = (completed[-1] - spawn).total_seconds() if completed else float("nan")
    span = (completed[-1] - completed[0]).total_seconds() if len(completed) > 1 else float("nan")
    queue = sorted((row.completed_at - row.created_at).total_seconds() * 1000 for row in succeeded)
    run = sorted((row.completed_at - row.started_at).total_seconds() * 1000 for row in succeeded)
    prompts = collections.Counter(fake["prompts"])
    expected = {f"job {i}" for i in range(n)}
    checks = {
        "rows": len(rows) == n,
        "all succeeded": len(succeeded) == n,
        "runs == 1": all(row.runs == 1 for row in ours if row is not None),
        "one submit per prompt": set(prompts) == expected and set(prompts.values()) == {1},
        "N downloads": fake["downloads"] == n,
    }
    per_worker = sorted(collections.Counter(row.claimed_by for row in succeeded).values(), reverse=True)
    window = {"created": created["elapsed"], "done": done["polled"]}
    return {
        "name": name,
        "n": n,
        "nworkers": nworkers,
        "created": created,
        "done": done,
        "created_rate": created["rate"],
        "completed_rate": n / total if total else float("nan"),
        "steady_rate": (len(completed) - 1) / span if span > 0 else float("nan"),
        "total_s": total,
        "first_claim_s": (claimed[0] - spawn).total_seconds() if claimed else float("nan"),
        "first_done_s": (completed[0] - spawn).total_seconds() if completed else float("nan"),
        "p50_queue": percentile(queue, 50),
        "p50_run": percentile(run, 50),
        "p99_run": percentile(run, 99),
        "checks": checks,
        "per_worker": per_worker,
        "fake": fake,
        "window": window,
        "submits": sum(prompts.values()),
        "statuses": collections.Counter(row.status for row in rows),
    }


def run_config(args: argparse.Namespace, spec: str) -> dict:
    backend, _, k = spec.partition(":")
    nworkers = int(k or 1)
    name = f"{'PostgreSQL' if backend == 'pg' else 'SQLite'}, {nworkers} worker{'s' if nworkers > 1 else ''}"
    print(f"\n{name} (--concurrency {args.concurrency} each), {args.jobs} predictions", flush=True)
    data_dir = Path(tempfile.mkdtemp(prefix="kontext-predbench-"))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "KONTEXT_DATABASE_URL", "KONTEXT_CONFIG")
    }
    pg_name = None
    if backend == "pg":
        pg_name = f"kontext_bench_{uuid.uuid4().hex[:10]}"
        try:
            asyncio.run(_admin(args.pg_server, f'CREATE DATABASE "{pg_name}"'))
        except OSError as exc:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise SystemExit(
                f"PostgreSQL at {args.pg_server} is not reachable ({exc}); run only SQLite with --configs sqlite:1"
            ) from None
        env["DATABASE_URL"] = f"{args.pg_server}/{pg_name}"
    fake_port, api_port = free_port(), free_port()
    env.update(
        REPLICATE_API_TOKEN=TOKEN, REPLICATE_BASE_URL=f"http://127.0.0.1:{fake_port}", KONTEXT_DATA_DIR=str(data_dir)
    )
    fake_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))}
    logs = [data_dir / "fake.log", data_dir / "api.log"]
    fake = api = None
    try:
        with open(logs[0], "wb") as out:
            fake = subprocess.Popen(
                [sys.executable, "-c", FAKE_CODE, str(fake_port), TOKEN, str(args.scale)],
                env=fake_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_http(fake, fake_port, "/results/none.png", 404, "the fake Replicate", logs[0])
        with open(logs[1], "wb") as out:
            api = subprocess.Popen(
                [*server_command(api_port, str(data_dir)), "--workers", "0"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        up = _wait_http(api, api_port, "/health", 200, "kontext serve", logs[1])
        print(
            f"  fake Replicate pid {fake.pid}, API pid {api.pid} (up in {up:.2f} s), data dir {data_dir}"
            + (f", database {pg_name}" if pg_name else ""),
            flush=True,
        )
        pids = {"api": api.pid, "fake": fake.pid}
        r = asyncio.run(
            phase_all(
                args,
                backend,
                nworkers,
                data_dir,
                env,
                f"http://127.0.0.1:{api_port}",
                pids,
                f"http://127.0.0.1:{fake_port}",
                logs,
            )
        )
        s = summarise(name, args.jobs, nworkers, r)
        s["log_lines"] = sum(p.read_bytes().count(b"\n") for p in logs if p.name.startswith("worker"))
        return s
    except Exception:
        for p in logs:
            if p.exists():
                print(f"--- {p.name} (tail) ---\n{p.read_text(errors='replace')[-2000:]}", file=sys.stderr)
        raise
    finally:
        stop_process(api)
        stop_process(fake)
        if pg_name:
            asyncio.run(_admin(args.pg_server, f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def _cpu(cpu_s: float, window: float, jobs: int) -> str:
    return f"{100 * cpu_s / window:.0f}% ({1000 * cpu_s / jobs:.2f} ms)"


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\n{args.jobs} predictions per configuration, {args.clients} concurrent creating clients, "
        f"`kontext worker --concurrency {args.concurrency}`, fake image scale {args.scale:g}. CPU: % of one core "
        "over the phase (CPU-ms per prediction in brackets).\n"
    )
    print("Creation (`kontext serve --workers 0`, no worker running):\n")
    print(
        "| config | N | created/s | create p50 ms | create p99 ms | API CPU | PostgreSQL CPU | PG connections opened "
        "| fake CPU | client CPU | machine busy | API RSS before → after |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in results:
        c, w, n = s["created"], s["window"]["created"], s["n"]
        print(
            f"| {s['name']} | {n} | **{s['created_rate']:.1f}** | {c['p50']:.1f} | {c['p99']:.1f} | "
            f"{_cpu(c['cpu']['api'], w, n)} | {_cpu(c['cpu']['postgres'], w, n)} | {c.get('sessions', '–')} | "
            f"{_cpu(c['cpu']['fake'], w, n)} | "
            f"{_cpu(c['cpu']['client'], w, n)} | "
            f"{100 * c['busy'] / w:.0f}% | {c['rss'][0]:.1f} → {c['rss'][1]:.1f} MiB |"
        )
    print("\nCompletion (worker processes spawned with N predictions waiting; times from the spawn):\n")
    print(
        "| config | N | completed/s | steady/s | all done s | first claim s | first done s | p50 created→done ms "
        "| p50 / p99 claimed→done ms | workers' CPU (each) | worker CPU-ms/job steady | PostgreSQL CPU "
        "| PG connections opened | fake CPU | API CPU | client CPU | machine busy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in results:
        d, w, n = s["done"], s["window"]["done"], s["n"]
        names = [k for k in d["cpu"] if k.startswith("worker")]
        total = sum(d["cpu"][k] for k in names)
        each = ", ".join(f"{100 * d['cpu'][k] / w:.0f}%" for k in names)
        print(
            f"| {s['name']} | {n} | **{s['completed_rate']:.1f}** | {s['steady_rate']:.1f} | {s['total_s']:.2f} | "
            f"{s['first_claim_s']:.2f} | {s['first_done_s']:.2f} | {s['p50_queue']:.0f} | "
            f"{s['p50_run']:.0f} / {s['p99_run']:.0f} | {_cpu(total, w, n)} [{each}] | {d['worker_ms_steady']:.2f} | "
            f"{_cpu(d['cpu']['postgres'], w, n)} | {d.get('sessions', '–')} | {_cpu(d['cpu']['fake'], w, n)} | "
            f"{_cpu(d['cpu']['api'], w, n)} | "
            f"{_cpu(d['cpu']['client'], w, n)} | "
            f"{100 * d['busy'] / w:.0f}% |"
        )
    print("\nChecks:\n")
    for s in results:
        ok = all(s["checks"].values())
        detail = ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in s["checks"].items())
        print(
            f"- {s['name']}: {'all passed' if ok else 'FAILED'} ({detail}); statuses {dict(s['statuses'])}; "
            f"fake: {s['submits']} submits, {s['fake']['downloads']} downloads, {s['fake']['requests']} requests; "
            f"jobs per worker {s['per_worker']}; worker log lines {s['log_lines']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", "-n", type=int, default=500, help="predictions per configuration (default 500)")
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["sqlite:1", "pg:1", "pg:3"],
        metavar="BACKEND:WORKERS",
        help="backend (sqlite or pg) and number of worker processes (default sqlite:1 pg:1 pg:3)",
    )
    ap.add_argument("--concurrency", type=int, default=8, help="`kontext worker --concurrency` (default 8)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent creating clients (default 16)")
    ap.add_argument("--poll", type=float, default=0.25, help="seconds between count queries (default 0.25)")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up on a configuration after S s (default 600)")
    ap.add_argument(
        "--scale", type=float, default=0.25, help="the fake's image scale (0.25 = 256x256 PNG for 1:1, the default)"
    )
    ap.add_argument(
        "--pg-server",
        default=PG_SERVER,
        help=f"PostgreSQL server URL without a database (default {PG_SERVER}); the benchmark creates "
        "and drops a database `kontext_bench_<hex>` on it for each pg configuration",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp data dirs (logs, SQLite file, blobs)")
    args = ap.parse_args()
    for spec in args.configs:
        backend, _, k = spec.partition(":")
        if backend not in ("sqlite", "pg") or not (k or "1").isdigit() or int(k or 1) < 1:
            ap.error(f"--configs: {spec!r} is not sqlite:K or pg:K")

    print(f"machine: {machine()}")
    watch, pg0 = CpuWatch(), postgres_cpu()
    results = [run_config(args, spec) for spec in args.configs]
    report(results, args)
    # common.CpuWatch.report() would count the PostgreSQL server as "other processes": leave it out here.
    pg = postgres_cpu() - pg0
    (busy, steal), wall = _machine_busy(), time.perf_counter() - watch.t0
    others = max(0.0, busy - watch.busy0 - (_own_and_children_cpu() - watch.own0) - pg)
    ncpu = len(os.sched_getaffinity(0))
    print(
        f"\nother processes used {others:.1f} CPU-s over {wall:.0f} s ({100 * others / (wall * ncpu):.0f}% of the "
        f"machine), steal {steal - watch.steal0:.1f} s; the PostgreSQL server, not counted there, used {pg:.1f} CPU-s"
        + ("  <-- results are skewed by other load" if others > 0.05 * wall * ncpu else "")
    )


if __name__ == "__main__":
    main()
