"""Latency the gateway adds over a hosted upstream, measured against a fake Replicate that answers at once.

Starts two processes: the fake Replicate of tests/fakes/replicate.py (`pending_polls=0`, so a
`Prefer: wait` create call comes back with the finished prediction) under uvicorn, and `kontext serve`
pointed at it (REPLICATE_API_TOKEN=r8_test, REPLICATE_BASE_URL=http://127.0.0.1:<fake port>). Then, at
each client count, for a fixed duration after a warm-up, it measures:

  direct   the upstream work the gateway does for one image, done by this client against the fake:
           POST /v1/models/black-forest-labs/flux-kontext-pro/predictions (Bearer r8_test, Prefer:
           wait=5, the input the gateway sends: prompt, aspect_ratio 1:1, output_format png, a seed),
           then GET the prediction's `output` URL and read the image;
  gateway  POST /v1/images/generations {"model": "replicate/flux.1-kontext-pro", "prompt": ...,
           "response_format": "url"} through the gateway, which does the two calls above, checks the
           result decodes as an image, stores it, records the request in SQLite and answers with a URL.

Both use the same httpx code (HTTP/1.1 keep-alive, `concurrency` connections in all), so the client's
cost is alike on both sides (the direct path makes two calls per request to the gateway path's one).
By default each simulated client has its own AsyncClient with one connection: one AsyncClient shared
by 64 clients (`--pool shared`) costs about 5x the client CPU per request, and at 64 clients the
direct path then measures the client rather than the fake (see RESULTS.md). Every request uses a
new random seed, as the gateway does, so the fake draws a different image each time and the
gateway's content-addressed blob store writes a new file each time (no dedup short-cut).

"added" = gateway percentile minus direct percentile. Percentiles do not subtract: this is the
difference between the percentiles of two distributions, not the percentile of a per-request cost.

The client, the gateway and the fake share the machine's CPUs. The CPU columns say how much each used
during the timed window, in % of one core and in CPU-ms per completed request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import (
    CpuWatch,
    Server,
    _machine_busy,
    cpu_seconds,
    free_port,
    http_get,
    machine,
    percentile,
    stop_process,
)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "r8_test"
UPSTREAM_MODEL = "black-forest-labs/flux-kontext-pro"
GATEWAY_MODEL = "replicate/flux.1-kontext-pro"
PROMPT = "a red fox in the snow"

FAKE_CODE = """
import sys, uvicorn
from fakes.common import ResultStore
from fakes.replicate import FakeReplicate
fake = FakeReplicate(token=sys.argv[2], pending_polls=0, results=ResultStore(scale=float(sys.argv[3])))
uvicorn.run(fake.app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


class FakeUpstream:
    """The fake Replicate as its own uvicorn process (uvloop + httptools, like the gateway)."""

    def __init__(self, scale: float) -> None:
        self.port = free_port()
        self.scale = scale
        self.log = tempfile.TemporaryFile()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> FakeUpstream:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FAKE_CODE, str(self.port), TOKEN, str(self.scale)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        t0 = time.perf_counter()
        while True:
            try:
                if http_get(self.port, "/results/none.png", timeout=1.0)[0] == 404:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.log.seek(0)
                self.stop()
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)
        self.log.close()


def direct_request(fake_url: str):
    url = f"{fake_url}/v1/models/{UPSTREAM_MODEL}/predictions"
    headers = {"Authorization": f"Bearer {TOKEN}", "Prefer": "wait=5"}

    async def one(client: httpx.AsyncClient) -> None:
        body = {
            "input": {"prompt": PROMPT, "aspect_ratio": "1:1", "output_format": "png", "seed": random.randrange(2**32)}
        }
        r = await client.post(url, json=body, headers=headers)
        r.raise_for_status()
        prediction = r.json()
        if prediction.get("status") != "succeeded" or not isinstance(prediction.get("output"), str):
            raise httpx.HTTPError(f"prediction not finished: {prediction.get('status')}")
        img = await client.get(prediction["output"])
        img.raise_for_status()
        if not img.content.startswith(b"\x89PNG"):
            raise httpx.HTTPError("the output is not a PNG")

    return one


def gateway_request(gateway_url: str):
    url = f"{gateway_url}/v1/images/generations"
    body = {"model": GATEWAY_MODEL, "prompt": PROMPT, "response_format": "url"}

    async def one(client: httpx.AsyncClient) -> None:
        r = await client.post(url, json=body)
        r.raise_for_status()
        if not r.json()["data"][0]["url"]:
            raise httpx.HTTPError("no url in the response")

    return one


def _own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


async def load(one, concurrency: int, duration: float, warmup: float, pids: dict[str, int], pool: str) -> dict:
    """`concurrency` workers, each sending requests back to back. pool="shared": one AsyncClient with
    a pool of `concurrency` connections; pool="per-worker": one AsyncClient (one connection) per worker."""

    def new_client(size: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        return httpx.AsyncClient(limits=limits, timeout=60.0, http2=False)

    async with contextlib.AsyncExitStack() as stack:
        if pool == "shared":
            shared = await stack.enter_async_context(new_client(concurrency))
            clients = [shared] * concurrency
        else:
            clients = [await stack.enter_async_context(new_client(1)) for _ in range(concurrency)]
        latencies: list[float] = []
        errors = 0
        recording = False

        async def worker(client: httpx.AsyncClient, deadline: float) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    await one(client)
                except (httpx.HTTPError, KeyError, ValueError, TypeError):
                    if recording:
                        errors += 1
                    continue
                if recording:
                    latencies.append(time.perf_counter() - t0)

        # Warm-up: the same load for `warmup` seconds (opens the pool's connections, warms both servers).
        end = time.perf_counter() + warmup
        await asyncio.gather(*(worker(client, end) for client in clients))

        recording = True
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client0, busy0, t_start = _own_cpu(), _machine_busy()[0], time.perf_counter()
        end = t_start + duration
        await asyncio.gather(*(worker(client, end) for client in clients))
        elapsed = time.perf_counter() - t_start
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        cpu["client"] = _own_cpu() - client0
        busy = _machine_busy()[0] - busy0
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    n = len(ms)
    return {
        "n": n,
        "errors": errors,
        "rps": n / elapsed,
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "cpu_pct": {k: 100 * v / elapsed for k, v in cpu.items()},
        "cpu_ms": {k: 1000 * v / n if n else float("nan") for k, v in cpu.items()},
        "machine_pct": 100 * busy / elapsed,
    }


# -- --parts: what one gateway request costs, part by part, in-process ----------------------------------


async def _parts(fake_url: str, data_dir: Path, n: int) -> list[tuple[str, float, float, float]]:
    """The gateway's own pieces timed one at a time, sequentially, on the loop uvicorn uses (uvloop),
    against the fake in its own process. Uses gateway internals (benchmark only; may need updating)."""
    import sqlite3

    sys.path.insert(0, str(ROOT / "tests"))
    from fakes.common import make_image
    from kontext_gateway.config import Settings
    from kontext_gateway.gateway import Gateway
    from kontext_gateway.imaging import decode_image
    from kontext_gateway.jobs.spec import to_params
    from kontext_gateway.keys import OPEN
    from kontext_gateway.protocol import image_call

    rows: list[tuple[str, float, float, float]] = []

    async def timed(name: str, fn) -> None:
        for _ in range(20):
            await fn()
        walls = []
        c0 = time.process_time()
        for _ in range(n):
            t0 = time.perf_counter()
            await fn()
            walls.append(time.perf_counter() - t0)
        cpu = time.process_time() - c0
        walls.sort()
        rows.append((name, 1000 * percentile(walls, 50), 1000 * percentile(walls, 99), 1000 * cpu / n))

    gw = Gateway(Settings(data_dir=data_dir))
    await gw.start()  # with its in-process workers: create() below is enqueue + claim + run + wait
    try:
        pngs = iter([make_image(256, 256, "png", seed=i) for i in range(n + 20)])
        png = make_image(256, 256, "png", seed=0)
        fields = {"model": GATEWAY_MODEL, "prompt": PROMPT, "response_format": "url"}
        base = "http://127.0.0.1/"
        prepared = await gw.images._prepare("req_x", image_call("text-to-image", fields), None, OPEN, base)
        job = prepared.job
        job_params = to_params(
            job,
            input_blob_ids=[],
            response_format="url",
            requested_model=prepared.params.model,
            forced=prepared.forced.config_key if prepared.forced else None,
            provider=None,
        )
        http = gw.providers["replicate"].http

        async def prepare() -> None:
            await gw.images._prepare("req_x", image_call("text-to-image", fields), None, OPEN, base)

        async def upstream_calls() -> None:
            body = {
                "input": {
                    "prompt": PROMPT,
                    "seed": random.randrange(2**32),
                    "aspect_ratio": "1:1",
                    "output_format": "png",
                }
            }
            r = await http.send(
                "POST",
                f"{fake_url}/v1/models/{UPSTREAM_MODEL}/predictions",
                json=body,
                headers={"Authorization": f"Bearer {TOKEN}", "Prefer": "wait=5"},
            )
            async with http.stream(r.json()["output"], headers={}) as result:
                await result.aread()

        async def decode() -> None:
            decode_image(png, param="output", max_pixels=gw.settings.max_input_pixels)

        async def route() -> None:
            p = await gw.images._prepare("req_x", image_call("text-to-image", fields), None, OPEN, base)
            await gw.router.run(gw.router.candidates(p.job.model, p.job.mode, p.job, forced=p.forced), p.job)

        async def blob() -> None:
            await gw.blobs.put(next(pngs), ext="png")

        async def db_writes() -> None:
            rid = "req_" + os.urandom(16).hex()
            await gw.db.create_request(
                id=rid, endpoint="images.generations", model=job.model.id, mode="text-to-image", params=job_params
            )
            await gw.db.mark_running(rid, provider=GATEWAY_MODEL)
            await gw.db.mark_succeeded(
                rid,
                provider=GATEWAY_MODEL,
                cost=0.04,
                currency="USD",
                output_blob_ids=["0" * 64 + ".png"],
                attempts=[{"provider": "replicate"}],
                output_size="256x256",
                output_format="png",
                duration_ms=10,
            )

        con = sqlite3.connect(data_dir / "raw.db", isolation_level=None)
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "CREATE TABLE r (id TEXT PRIMARY KEY, status TEXT, params TEXT, attempts TEXT, blobs TEXT)",
        ):
            con.execute(pragma)
        params = json.dumps(job_params)

        async def raw_writes() -> None:
            rid = os.urandom(16).hex()
            for sql, values in (
                ("INSERT INTO r VALUES (?, 'queued', ?, '[]', '[]')", (rid, params)),
                ("UPDATE r SET status = 'running' WHERE id = ?", (rid,)),
                (
                    "UPDATE r SET status = 'succeeded', attempts = ?, blobs = ? WHERE id = ?",
                    ('[{"provider": "replicate"}]', '["x.png"]', rid),
                ),
            ):
                con.execute("BEGIN")
                con.execute(sql, values)
                con.execute("COMMIT")

        async def create() -> None:
            await gw.images.create(image_call("text-to-image", dict(fields)), base_url=base)

        await timed("image_call + ImageService._prepare: parse, validate, resolve the model, order providers", prepare)
        await timed("the 2 upstream calls (POST prediction, GET output), as the provider makes them", upstream_calls)
        await timed("decode_image of the 256x256 result (once per request)", decode)
        await timed("_prepare + Router.run: upstream calls, decode, attempt bookkeeping", route)
        await timed("LocalBlobStore.put: sha256, mkdir, temp file, write, fsync, rename", blob)
        await timed("3 request-record writes: create_request, mark_running, mark_succeeded", db_writes)
        await timed("  the same 3 writes with the sqlite3 module directly (reference)", raw_writes)
        await timed("ImageService.create: the whole request as a job, without the HTTP server", create)
        con.close()
    finally:
        await gw.close()
    return rows


def run_parts(n: int, scale: float) -> None:
    import uvloop

    print(f"machine: {machine()}")
    watch = CpuWatch()
    fake = FakeUpstream(scale).start()
    data_dir = Path(tempfile.mkdtemp(prefix="kontext-parts-"))
    os.environ.update(REPLICATE_API_TOKEN=TOKEN, REPLICATE_BASE_URL=fake.url)
    try:
        rows = uvloop.run(_parts(fake.url, data_dir, n))
    finally:
        fake.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"\n{n} calls of each part, one at a time, in this process (uvloop), the fake in its own process\n")
    print("| part | wall p50 ms | wall p99 ms | CPU ms per call |")
    print("|---|---:|---:|---:|")
    for name, p50, p99, cpu in rows:
        print(f"| {name} | {p50:.3f} | {p99:.3f} | {cpu:.3f} |")
    print(f"\n{watch.report()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per measurement (default 20)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load before each (default 3)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64], help="client counts (default 1 64)")
    ap.add_argument(
        "--only",
        choices=["direct", "gateway"],
        default=None,
        help="measure one path only (e.g. while profiling the gateway with py-spy)",
    )
    ap.add_argument(
        "--pool",
        choices=["per-worker", "shared"],
        default="per-worker",
        help="per-worker (default): each client has its own AsyncClient with one keep-alive "
        "connection; shared: one AsyncClient whose pool holds `concurrency` connections "
        "(httpx's pool costs CPU that grows with its size, see RESULTS.md)",
    )
    ap.add_argument(
        "--scale",
        type=float,
        default=0.25,
        help="the fake's image scale (ResultStore.scale; 0.25 = 256x256 PNG for 1:1, the default)",
    )
    ap.add_argument(
        "--parts",
        type=int,
        metavar="N",
        default=None,
        help="instead: time the gateway's parts in-process, N calls each (no HTTP server)",
    )
    args = ap.parse_args()
    if args.parts:
        run_parts(args.parts, args.scale)
        return

    print(f"machine: {machine()}")
    watch = CpuWatch()
    fake = FakeUpstream(args.scale).start()
    # The gateway inherits this process's environment: point its Replicate adapter at the fake.
    for var in ("DATABASE_URL", "KONTEXT_DATABASE_URL", "KONTEXT_CONFIG"):
        os.environ.pop(var, None)
    os.environ.update(REPLICATE_API_TOKEN=TOKEN, REPLICATE_BASE_URL=fake.url)
    rows: list[tuple[str, int, dict]] = []
    try:
        with Server() as server:
            print(
                f"fake Replicate on {fake.url} (pid {fake.proc.pid}), gateway on {server.url} "
                f"(pid {server.proc.pid}, up in {server.startup_s:.2f}s)",
                flush=True,
            )
            pids = {"gateway": server.proc.pid, "fake": fake.proc.pid}
            paths = [("direct", direct_request(fake.url)), ("gateway", gateway_request(server.url))]
            for c in args.concurrency:
                for name, one in paths:
                    if args.only in (None, name):
                        r = asyncio.run(load(one, c, args.duration, args.warmup, pids, args.pool))
                        rows.append((name, c, r))
                        print(f"  {name} c={c}: {r['n']} requests, p50 {r['p50']:.2f} ms", flush=True)
    finally:
        fake.stop()

    print(
        f"\n{args.duration:g} s per measurement after {args.warmup:g} s of warm-up, client pool {args.pool}; "
        "latencies in ms; "
        "CPU in % of one core and CPU-ms per request, over the timed window\n"
    )
    print(
        "| path | clients | requests | errors | req/s | p50 | p90 | p99 | gateway CPU | fake CPU | client CPU "
        "| machine busy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, c, r in rows:
        cpu = " | ".join(f"{r['cpu_pct'][k]:.0f}% ({r['cpu_ms'][k]:.2f} ms)" for k in ("gateway", "fake", "client"))
        print(
            f"| {name} | {c} | {r['n']} | {r['errors']} | {r['rps']:.1f} | {r['p50']:.2f} | {r['p90']:.2f} | "
            f"{r['p99']:.2f} | {cpu} | {r['machine_pct']:.0f}% |"
        )
    by = {(name, c): r for name, c, r in rows}
    added = [c for c in args.concurrency if ("direct", c) in by and ("gateway", c) in by]
    if added:
        print(
            "\nAdded latency = gateway percentile - direct percentile (a difference of percentiles, "
            "not a percentile of differences):\n"
        )
        print("| clients | p50 direct | p50 gateway | added p50 | p99 direct | p99 gateway | added p99 |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for c in added:
            d, g = by[("direct", c)], by[("gateway", c)]
            print(
                f"| {c} | {d['p50']:.2f} | {g['p50']:.2f} | {g['p50'] - d['p50']:+.2f} | "
                f"{d['p99']:.2f} | {g['p99']:.2f} | {g['p99'] - d['p99']:+.2f} |"
            )
    print(f"\n{watch.report()}")


if __name__ == "__main__":
    main()
