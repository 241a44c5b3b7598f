"""Server start-up time, idle memory, and whether torch is imported before a local model is used.

Start-up: from spawning `kontext serve` to the first 200 from GET /health (several runs, min/median).
Idle RSS: VmRSS of the server process (plus any children) after start-up and after one GET /v1/models.
torch at idle: checked in-process (TestClient runs the app's lifespan, then GET /v1/models, then we
look at sys.modules) and, for the real server, whether libtorch is mapped into its address space.
Idle CPU: the server's own CPU time (its threads) over `--idle` seconds after start-up, no request
made: what its background loops (job and webhook claims, leases) cost a machine that serves nothing.
Targets: start-up < 2 s, idle RSS < 200 MB without torch loaded.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import httpx

from common import CpuWatch, Server, cpu_seconds, http_get, machine, rss_mb

STARTUP_TARGET_S = 2.0
RSS_TARGET_MB = 200.0

TORCH_CHECK = """
import sys, tempfile
from fastapi.testclient import TestClient
from kontext_gateway.api.app import create_app
from kontext_gateway.config import Settings
app = create_app(Settings(data_dir=tempfile.mkdtemp(prefix="kontext-bench-")))
with TestClient(app, base_url="http://127.0.0.1") as client:  # an allowed host
    assert client.get("/v1/models").status_code == 200
    print("torch" in sys.modules, sorted(m for m in ("diffusers", "transformers", "numpy") if m in sys.modules))
"""


def torch_mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="number of server starts (default 5)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait before reading RSS (default 1)")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds the idle server's CPU is read over (default 30)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    watch = CpuWatch()

    times, rss_start, rss_models, mapped = [], [], [], []
    for i in range(args.runs):
        with Server() as server:
            times.append(server.startup_s)
            time.sleep(args.settle)
            rss_start.append(rss_mb(server.proc.pid))
            assert http_get(server.port, "/v1/models")[0] == 200
            time.sleep(args.settle)
            rss_models.append(rss_mb(server.proc.pid))
            mapped.append(torch_mapped(server.proc.pid))
            if i == args.runs - 1:  # for reference: the footprint once the tiny model is loaded
                body = {"model": "kontext-tiny", "prompt": "a fox", "size": "64x64", "response_format": "b64_json"}
                httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=300).raise_for_status()
                rss_gen = rss_mb(server.proc.pid)
        print(
            f"run {i + 1}: start-up {server.startup_s:.3f}s, RSS {rss_start[-1]:.1f} MiB idle, "
            f"{rss_models[-1]:.1f} MiB after GET /v1/models, libtorch mapped: {mapped[-1]}"
        )

    with Server() as server:
        time.sleep(5.0)  # past start-up's own work
        cpu0 = cpu_seconds(server.proc.pid)
        time.sleep(args.idle)
        idle_ms_per_s = (cpu_seconds(server.proc.pid) - cpu0) / args.idle * 1000
    print(f"idle server: {idle_ms_per_s:.2f} CPU-ms per second over {args.idle:g} s")

    out = subprocess.run([sys.executable, "-c", TORCH_CHECK], capture_output=True, text=True, check=True)
    torch_loaded, others = out.stdout.strip().split(" ", 1)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    startup_med, rss_max = statistics.median(times), max(rss_models)
    no_torch = torch_loaded == "False" and not any(mapped)
    print()
    print("| metric | value | target | |")
    print("|---|---:|---|---|")
    print(
        f"| start-up, min / median of {args.runs} | {min(times):.3f} s / {startup_med:.3f} s "
        f"| < {STARTUP_TARGET_S:g} s | {verdict(startup_med < STARTUP_TARGET_S)} |"
    )
    print(f"| idle RSS after start-up (median) | {statistics.median(rss_start):.1f} MiB | | |")
    print(
        f"| idle RSS after GET /v1/models (max) | {rss_max:.1f} MiB "
        f"| < {RSS_TARGET_MB:g} MB | {verdict(rss_max < RSS_TARGET_MB)} |"
    )
    print(f"| RSS after one kontext-tiny generation (torch loaded; reference) | {rss_gen:.1f} MiB | | |")
    print(f"| CPU of the idle server, over {args.idle:g} s | {idle_ms_per_s:.2f} ms per second | | |")
    print(
        f"| torch imported at idle (TestClient, in-process) | {torch_loaded} (also loaded: {others}) "
        f"| False | {verdict(torch_loaded == 'False')} |"
    )
    print(f"| libtorch mapped in the idle server | {any(mapped)} | False | {verdict(not any(mapped))} |")
    met = startup_med < STARTUP_TARGET_S and rss_max < RSS_TARGET_MB and no_torch
    print(f"\nall targets {'met' if met else 'NOT all met'}")
    print(watch.report())


if __name__ == "__main__":
    main()
