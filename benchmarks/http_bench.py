"""HTTP throughput and latency of a real `kontext serve` process.

Measures GET /v1/models and POST /v1/images/generations (kontext-tiny, 64x64, b64_json) at 1 and 32
concurrent clients with an httpx.AsyncClient (HTTP/1.1 keep-alive, pool = concurrency), for a fixed
duration after a warm-up. GET /v1/models is also measured with `wrk` when it is installed: the Python
client shares the CPU with the server, so its numbers are a lower bound on what the server can do.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import shutil
import subprocess
import time

import httpx

from common import CpuWatch, Server, cpu_seconds, machine, percentile

GEN_BODY = {"model": "kontext-tiny", "prompt": "a red fox in the snow", "size": "64x64", "response_format": "b64_json"}


async def load(url: str, method: str, body: dict | None, concurrency: int, duration: float, warmup: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=300.0, http2=False) as client:

        async def one() -> None:
            r = await client.request(method, url, json=body)
            r.raise_for_status()
            await r.aread()

        for _ in range(warmup):  # opens the pool's connections and warms the server's code paths
            await asyncio.gather(*(one() for _ in range(concurrency)))

        latencies: list[float] = []
        errors = 0
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    await one()
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "n": len(ms),
        "errors": errors,
        "rps": len(ms) / elapsed,
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
    }


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def run_wrk(url: str, connections: int, duration: float) -> dict | None:
    if shutil.which("wrk") is None:
        return None
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def lat(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(m.group(1)) * _UNIT_MS[m.group(2)] if m else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "n": int(total.group(1)) if total else 0,
        "errors": (int(bad.group(1)) if bad else 0) + (sum(map(int, errs.groups())) if errs else 0),
        "rps": float(rps.group(1)) if rps else float("nan"),
        "p50": lat("50"),
        "p90": lat("90"),
        "p99": lat("99"),
    }


def client_cpu() -> float:
    """CPU seconds used by this process and by its finished children (wrk)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measured(server: Server, fn, *args) -> dict | None:
    """Run one measurement; add the server's and the client's CPU use (% of one core) over it."""
    s0, c0, t0 = cpu_seconds(server.proc.pid), client_cpu(), time.perf_counter()
    result = fn(*args)
    wall = time.perf_counter() - t0
    if result is not None:
        result["server_cpu"] = 100 * (cpu_seconds(server.proc.pid) - s0) / wall
        result["client_cpu"] = 100 * (client_cpu() - c0) / wall
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per measurement (default: 10 for /v1/models, 20 for generations)",
    )
    ap.add_argument("--port", type=int, default=None, help="server port (default: a free port)")
    ap.add_argument("--skip-generation", action="store_true", help="only measure GET /v1/models")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="client counts (default 1 32)")
    args = ap.parse_args()
    models_s = args.duration or 10.0
    gen_s = args.duration or 20.0

    print(f"machine: {machine()}")
    watch = CpuWatch()
    rows: list[tuple[str, str, int, dict]] = []
    with Server(args.port) as server:
        print(f"server up on {server.url} in {server.startup_s:.2f}s")
        models_url = f"{server.url}/v1/models"
        for c in args.concurrency:
            rows.append(
                (
                    "GET /v1/models",
                    "httpx",
                    c,
                    measured(server, asyncio.run, load(models_url, "GET", None, c, models_s, 3)),
                )
            )
            if (w := measured(server, run_wrk, models_url, c, models_s)) is not None:
                rows.append(("GET /v1/models", "wrk", c, w))
        if not args.skip_generation:
            gen_url = f"{server.url}/v1/images/generations"
            t0 = time.perf_counter()
            httpx.post(gen_url, json=GEN_BODY, timeout=600).raise_for_status()  # builds the model
            print(f"first generation (builds kontext-tiny): {time.perf_counter() - t0:.2f}s")
            for c in args.concurrency:
                rows.append(
                    (
                        "POST /v1/images/generations 64x64",
                        "httpx",
                        c,
                        measured(server, asyncio.run, load(gen_url, "POST", GEN_BODY, c, gen_s, 1)),
                    )
                )
    if shutil.which("wrk") is None:
        print("(wrk not installed: GET /v1/models measured with the Python client only)")

    print()
    print(
        "| endpoint | client | conc. | requests | errors | req/s | p50 ms | p90 ms | p99 ms | server CPU | client CPU |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, client, c, r in rows:
        print(
            f"| {name} | {client} | {c} | {r['n']} | {r['errors']} | {r['rps']:.1f} | "
            f"{r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} | {r['server_cpu']:.0f}% | {r['client_cpu']:.0f}% |"
        )
    print(f"\n{watch.report()}")


if __name__ == "__main__":
    main()
