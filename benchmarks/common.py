"""Helpers shared by the benchmark scripts: start/stop the server, percentiles, RSS, machine info."""

from __future__ import annotations

import asyncio
import http.client
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, data_dir: str) -> list[str]:
    """`kontext serve` from the interpreter's own venv (falls back to `python -m kontext_gateway`)."""
    script = Path(sys.executable).with_name("kontext")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "kontext_gateway"]
    return [
        *base,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        data_dir,
        "--log-level",
        "warning",
    ]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Server:
    """The gateway as a subprocess on a free port with a fresh temporary data dir."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = tempfile.mkdtemp(prefix="kontext-bench-")
        self.log = open(Path(self.data_dir) / "server.log", "wb")
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Server:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            server_command(self.port, self.data_dir), stdout=self.log, stderr=subprocess.STDOUT
        )
        while True:
            try:
                if http_get(self.port, "/health", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"server did not start; log: {Path(self.data_dir) / 'server.log'}")
            time.sleep(0.005)
        self.startup_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)
        self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Ask a process to stop (SIGTERM by default), kill it if it has not within `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out + [g for c in out for g in _children(c)]


def rss_mb(pid: int) -> float:
    """VmRSS of `pid` plus all its descendants, in MiB."""
    total_kb = 0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total_kb / 1024


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return (
        f"nproc={len(os.sched_getaffinity(0))}, CPU={cpu}, RAM={mem_kb / 1024 / 1024:.1f} GiB, "
        f"Python {platform.python_version()}, {datetime.now(UTC):%Y-%m-%d %H:%M UTC}, "
        f"loadavg {' '.join(open('/proc/loadavg').read().split()[:3])}"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _own_cpu() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class CpuWatch:
    """How much CPU *other* processes used while this benchmark ran: a check that results are clean.

    Call `report()` after every child process (server, wrk) has been waited for.
    """

    def __init__(self) -> None:
        self.busy0, self.steal0 = _machine_busy()
        self.own0, self.t0 = _own_cpu(), time.perf_counter()

    def report(self) -> str:
        busy, steal = _machine_busy()
        wall = time.perf_counter() - self.t0
        others = max(0.0, (busy - self.busy0) - (_own_cpu() - self.own0))
        ncpu = len(os.sched_getaffinity(0))
        return (
            f"other processes used {others:.1f} CPU-s over {wall:.0f} s "
            f"({100 * others / (wall * ncpu):.0f}% of the machine), steal {steal - self.steal0:.1f} s"
            + ("  <-- results are skewed by other load" if others > 0.05 * wall * ncpu else "")
        )


T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """`coro` on uvloop where installed (as the gateway runs), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
