"""The gateway side by side with the LiteLLM proxy, against the same fast upstream fake, in one run.

Compare ratios, not absolute times: both gateways run on this machine, one process each, against one
fake upstream (fast_upstream.py: BFL and Replicate shapes, every task done at once) that serves TLS
on the providers' production host names. Three processes, started once:

  fake      benchmarks/fast_upstream.py under uvicorn, https on 127.0.0.1:443 (a high port where 443
            cannot be bound). A throwaway CA and a server certificate for api.bfl.ai, *.bfl.ai,
            api.us1.bfl.ai, api.replicate.com and replicate.delivery are made with the openssl CLI in
            a temp dir. Results: a 1024x1024 photo-like picture, ~1.7 MB as PNG, ~0.15 MB as JPEG
            (quality 90), made unique per task (a comment chunk) so nothing deduplicates them.
  kontext   `kontext serve` with its shipped defaults (fresh --data-dir), pointed at the fake only by
            BFL_API_KEY, BFL_BASE_URL=https://api.bfl.ai, REPLICATE_API_TOKEN,
            REPLICATE_BASE_URL=https://api.replicate.com (and, on a high port, KONTEXT_PROVIDER_HOSTS
            for the polling host). `--src DIR` runs another checkout's src.
  litellm   `litellm --config ... --num_workers 1` from its own venv (.venv-litellm, made with
            `pip install 'litellm[proxy]'` when missing; never a project dependency): one model,
            black_forest_labs/flux-kontext-pro, no database, a master key, telemetry off, logging at
            ERROR. LiteLLM's image generation drops the deployment's api_key / api_base (only
            BFL_API_KEY / BFL_API_BASE reach its BFL handler), so those are set in its environment too.

Both gateway processes get SSL_CERT_FILE (the throwaway CA) and a sitecustomize.py on PYTHONPATH that
resolves those host names, and only those, to 127.0.0.1 (socket.getaddrinfo and uvloop's
loop.getaddrinfo): the same hook for both.

Unpinned (the default), the gateway under test, the fake and the clients share the machine's cores, so
at 64 clients req/s is what the load leaves of the machine, for either gateway. `--pin` puts each
gateway (its threads and child processes) on CPU 0 alone and the fake and this script's clients on the
other CPUs: req/s is then what one core of each gateway serves, as long as the other cores keep up
with the load (on a 2-core machine they do not at 64 clients: benchmarks/RESULTS.md, section 21).

What each does per request (POST /v1/images/generations, aspect_ratio 1:1, output_format png or jpeg):

  kontext   validates the request and records it as a job (SQLite, durable), a worker claims it,
            submits to the upstream and records the task, polls on its own schedule (config.py,
            `upstream_poll_interval_s`), downloads the result, checks that it decodes as an image,
            stores it (content-addressed blob file) and marks the request succeeded, then answers with
            a URL on itself (`response_format: url`). Replicate: one `Prefer: wait` create that comes
            back finished, then the download. It keeps every result: a long run fills GBs of its
            temporary data dir (the size is printed at the end).
  litellm   checks the master key, routes to the deployment, submits, polls at once (then every
            1.5 s) and answers with the upstream's own result URL. It downloads nothing and stores
            nothing. LiteLLM 1.108.7 has no Replicate image-generation route (litellm/llms/replicate
            is chat only), so `replicate-png` measures the gateway alone.

The fake is Ready at once, so a gateway's wait before its first poll is part of its latency and, in a
closed loop, of its req/s; CPU-ms per request and peak RSS compare the work each does.

The upstream's own latency, in the same run: at one client, a third side, `direct`, makes BFL's three
calls itself (submit, poll the returned polling_url, download the result; `x-key` on the first two),
from this process, with aiohttp (the client under the gateway's own upstream calls, and the cheapest
here: the lowest floor), keep-alive to each of the fake's hosts. A gateway's p50 at one client minus
direct's is the latency it adds; the summary prints it (medians over the repeats).

Load: for each client count (default 1 8 64), a closed loop (each client sends its next request when
the previous one answers; every prompt numbered, so no two requests are the same), each client an
httpx.AsyncClient of its own with one keep-alive connection (one client shared by all, pool = clients,
spent most of this process's CPU at 64 clients in httpcore's pool, matching waiting requests to
connections: up to 5 CPU-ms per request), `--warmup` seconds, then
`--duration` seconds measured, without a pause between them: what completes inside the measured window
counts (its latency may have started before), and CPU and peak RSS are read at the window's ends.
For each repeat, for each upstream, for each client count: kontext, litellm (and at one client
direct), the order reversed every other repeat. A request counts only when it answers 200 with one
`data[0].url`; anything else is an error (never throughput). Per run: req/s, p50, p99, errors, CPU-ms
per request of the gateway process (with its children), of the fake and of this client, and the
gateway's peak RSS (VmHWM, reset per run through /proc/PID/clear_refs). Then per upstream and client
count: medians over the repeats and the ratios kontext/litellm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import resource
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from common import (
    CpuWatch,
    _children,
    free_port,
    http_get,
    machine,
    percentile,
    rss_mb,
    run_loop,
    server_command,
    stop_process,
)
from fast_upstream import HOSTS

ROOT = Path(__file__).resolve().parent.parent
BFL_KEY = "bfl_bench"
REPLICATE_TOKEN = "r8_bench"
PROMPT = "a red fox in the snow, golden hour, 35 mm photo"
CERT_NAMES = ("api.bfl.ai", "*.bfl.ai", "api.us1.bfl.ai", "*.us1.bfl.ai", "api.replicate.com", "replicate.delivery")
# Variables that would move the gateway off its shipped defaults or elsewhere than the fake.
FOREIGN_ENV_PREFIXES = ("KONTEXT_", "LITELLM_", "BFL_", "REPLICATE_", "FAL_", "FIREWORKS_")
FOREIGN_ENV = {"DATABASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_DIR", "PYTHONPATH"}

HOOK = '''\
"""Benchmark only: resolve the fake upstream's host names to 127.0.0.1 (gateway_vs_litellm.py)."""

import socket

HOSTS = frozenset({hosts!r})
_getaddrinfo = socket.getaddrinfo


def _map(host):
    name = host.decode() if isinstance(host, bytes) else host
    return "127.0.0.1" if isinstance(name, str) and name.lower().rstrip(".") in HOSTS else host


def getaddrinfo(host, *args, **kwargs):
    return _getaddrinfo(_map(host), *args, **kwargs)


socket.getaddrinfo = getaddrinfo

try:
    import uvloop
except ImportError:
    uvloop = None
if uvloop is not None:  # uvloop resolves through libuv, not socket.getaddrinfo
    _loop_getaddrinfo = uvloop.Loop.getaddrinfo

    async def loop_getaddrinfo(self, host, *args, **kwargs):
        return await _loop_getaddrinfo(self, _map(host), *args, **kwargs)

    uvloop.Loop.getaddrinfo = loop_getaddrinfo
'''


@dataclass(frozen=True)
class Upstream:
    name: str
    provider: str  # "bfl" or "replicate"
    fmt: str  # output_format asked for
    gateway_model: str  # a config key: forces the provider


UPSTREAMS = {
    "bfl-png": Upstream("bfl-png", "bfl", "png", "bfl/flux.1-kontext-pro"),
    "bfl-jpeg": Upstream("bfl-jpeg", "bfl", "jpeg", "bfl/flux.1-kontext-pro"),
    "replicate-png": Upstream("replicate-png", "replicate", "png", "replicate/flux.1-kontext-pro"),
}


@dataclass
class Run:
    upstream: str
    clients: int
    side: str  # "kontext", "litellm" or "direct"
    repeat: int
    n: int = 0
    errors: int = 0
    error_sample: str = ""
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    server_cpu_ms: float = float("nan")  # per successful request, the gateway process and its children
    fake_cpu_ms: float = float("nan")
    client_cpu_ms: float = float("nan")
    peak_rss_mb: float = float("nan")
    peak_reset: bool = False  # False: VmHWM since the process started (clear_refs refused)


# -- processes -------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live descendants, plus what its reaped children used."""
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for i, p in enumerate([pid, *_children(pid)]):
        try:
            fields = _proc_stat(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        if i == 0:
            total += int(fields[13]) + int(fields[14])
    return total / hz


def reset_peak(pid: int) -> bool:
    """Reset VmHWM of `pid` and its descendants (write 5 to clear_refs); False where not permitted."""
    ok = True
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def peak_rss_mb(pid: int) -> float:
    """VmHWM of `pid` plus its descendants', in MiB."""
    total_kb = 0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return total_kb / 1024


class Process:
    """A child process with its log in a file, started and waited for."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str],
        log: Path,
        cwd: Path | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.name, self.cmd, self.env, self.log_path, self.cwd = name, cmd, env, log, cwd
        self.cpus = cpus  # the CPUs it may run on (its threads and child processes too); None: any
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = float("nan")
        self.idle_rss_mb = float("nan")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready: Callable[[], bool], timeout: float) -> Process:
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd)
        if self.cpus is not None:  # before it starts any thread or child: they inherit it
            os.sched_setaffinity(self.proc.pid, self.cpus)
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if ready():
                    break
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{self.name} did not start; its log ends:\n{self.tail()}")
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - t0
        time.sleep(1.0)  # let start-up work settle before the idle reading
        self.idle_rss_mb = rss_mb(self.pid)
        return self

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        stop_process(self.proc, timeout=20)


def tls_ready(port: int, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
        ctx.wrap_socket(raw, server_hostname=HOSTS[0]),
    ):
        return True


def http_ready(port: int, path: str) -> Callable[[], bool]:
    return lambda: http_get(port, path, timeout=1.0)[0] == 200


def make_tls(tmp: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key): a throwaway CA and a certificate it signs for
    the fake's host names, made with the openssl CLI."""
    ca, ca_key, cert, key, csr = (tmp / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "server.csr"))
    ext = tmp / "server.ext"
    ext.write_text(
        f"subjectAltName={','.join(f'DNS:{n}' for n in CERT_NAMES)}\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    signed = ["-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2", "-extfile", ext]
    steps = [
        ["openssl", "req", "-x509", *ec, *ca_ext, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=bench CA"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={HOSTS[0]}"],
        ["openssl", "x509", "-req", "-in", csr, *signed, "-out", cert],
    ]
    for step in steps:
        subprocess.run([str(a) for a in step], check=True, capture_output=True)
    return ca, cert, key


def pick_port(requested: int | None) -> int:
    """443 where it can be bound (the providers' URLs exactly), else a free high port."""
    if requested:
        return requested
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 443))
        except OSError:
            return free_port()
    return 443


def base_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k not in FOREIGN_ENV and not k.upper().startswith(FOREIGN_ENV_PREFIXES)
    }


def ensure_litellm(venv: Path) -> Path:
    """The `litellm` CLI of `venv`, made (python3 -m venv + pip install 'litellm[proxy]') when missing."""
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print(f"creating {venv} and installing litellm[proxy] (minutes)...", flush=True)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"], check=True)
    return exe


def litellm_facts(venv: Path) -> tuple[str, bool]:
    """(LiteLLM's version, whether it has a Replicate image-generation route)."""
    code = (
        "import importlib.metadata as m, sysconfig; "
        "print(m.version('litellm')); print(sysconfig.get_paths()['purelib'])"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    version, purelib = out[0], Path(out[1])
    replicate = purelib / "litellm" / "llms" / "replicate"
    images = (purelib / "litellm" / "images" / "main.py").read_text()
    has_route = (replicate / "image_generation").is_dir() or 'custom_llm_provider == "replicate"' in images
    return version, has_route


# -- load ------------------------------------------------------------------------------------------------


@dataclass
class Target:
    side: str
    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    process: Process | None  # the server measured; None for `direct` (the calls are this process's own)
    extra: dict[str, Any] = field(default_factory=dict)
    # `direct`: a client of its own per closed loop (made by this), in place of an httpx one
    caller: Callable[[], contextlib.AbstractAsyncContextManager[Call]] | None = None
    fetch: bool = False  # each answer's URL fetched too, as a client that shows the image would


Call = Callable[[dict[str, Any]], Awaitable[str | None]]  # one request: None when it went well, else why not


def direct_bfl(base: str, tls: ssl.SSLContext) -> Callable[[], contextlib.AbstractAsyncContextManager[Call]]:
    """BFL's own three calls made straight to the fake (`x-key` on the first two), by aiohttp, the client
    under the gateway's own upstream calls (the cheapest here): the floor a gateway's latency is measured
    over. Each closed loop has its own session, keep-alive to each of the fake's hosts."""
    headers = {"x-key": BFL_KEY}

    @contextlib.asynccontextmanager
    async def caller() -> AsyncIterator[Call]:
        connector = aiohttp.TCPConnector(limit=4, ssl=tls)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:

            async def call(body: dict[str, Any]) -> str | None:
                task = {k: body[k] for k in ("prompt", "aspect_ratio", "output_format")}
                async with session.post(f"{base}/v1/flux-kontext-pro", json=task, headers=headers) as sub:
                    if sub.status != 200:
                        return f"submit: HTTP {sub.status}: {(await sub.text())[:200]}"
                    polling_url = (await sub.json())["polling_url"]
                async with session.get(polling_url, headers=headers) as poll:
                    result = await poll.json() if poll.status == 200 else {}
                if result.get("status") != "Ready":
                    return f"poll: HTTP {poll.status}: {str(result)[:200]}"
                async with session.get(result["result"]["sample"]) as image:
                    data = await image.read()
                if image.status != 200 or not data.startswith((b"\x89PNG", b"\xff\xd8\xff")):
                    return f"download: HTTP {image.status}, {len(data)} bytes"
                return None

            yield call

    return caller


def check_answer(r: httpx.Response) -> str | None:
    """None for a good answer (200, one data[0].url, or data[0].b64_json when that was asked), else why not."""
    return answered_image(r)[0]


def answered_image(r: httpx.Response) -> tuple[str | None, str]:
    """Why the answer is not good (None when it is), and its data[0].url or .b64_json (each answer's
    JSON parsed once)."""
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:300]}", ""
    try:
        data = r.json().get("data")
    except ValueError:
        return f"HTTP 200, not JSON: {r.text[:200]}", ""
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
        return f"HTTP 200, data is not one item: {r.text[:200]}", ""
    image = data[0].get("url") or data[0].get("b64_json")
    if not isinstance(image, str) or not image:
        return f"HTTP 200 without data[0].url or .b64_json: {r.text[:200]}", ""
    return None, image


def own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


async def load(target: Target, clients: int, duration: float, warmup: float, fake_pid: int, run: Run) -> None:
    """`clients` closed loops for `warmup` + `duration` seconds, without a pause in between; what completes
    inside the measured window is counted, and the CPU and peak RSS are read at its two ends."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)  # each client its own connection
    timeout = httpx.Timeout(120.0, connect=10.0)
    done: list[tuple[float, float, str | None]] = []  # (completed at, seconds, why it failed or None)
    window = [0.0, 0.0]
    cpu: dict[str, float] = {}
    t_start = time.perf_counter() + warmup
    t_end = t_start + duration

    async with contextlib.AsyncExitStack() as stack:
        sent = itertools.count()

        async def worker() -> None:
            call: Call
            if target.caller is not None:
                call = await stack.enter_async_context(target.caller())
            else:
                client = await stack.enter_async_context(
                    httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)
                )

                async def call(body: dict[str, Any]) -> str | None:
                    answer = await client.post(target.url, json=body, headers=target.headers)
                    why, url = answered_image(answer)
                    if why is None and target.fetch and url.startswith(("https://", "http://")):
                        image = await client.get(url)
                        if image.status_code != 200 or not image.content.startswith((b"\x89PNG", b"\xff\xd8\xff")):
                            why = f"GET of the result: HTTP {image.status_code}, {image.content[:40]!r}"
                    return why

            while time.perf_counter() < t_end:
                # Each prompt its own, as users' are: nothing keyed on the body is reused across requests.
                body = {**target.body, "prompt": f"{target.body['prompt']} #{next(sent)}"}
                t0 = time.perf_counter()
                why: str | None
                try:
                    why = await call(body)
                except (httpx.HTTPError, aiohttp.ClientError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                t1 = time.perf_counter()
                done.append((t1, t1 - t0, why))

        async def sampler() -> None:
            pid = target.process.pid if target.process is not None else None
            await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
            if pid is not None:
                run.peak_reset = reset_peak(pid)
            cpu.update(
                server=-tree_cpu_seconds(pid) if pid else 0.0, fake=-tree_cpu_seconds(fake_pid), client=-own_cpu()
            )
            window[0] = time.perf_counter()
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
            window[1] = time.perf_counter()
            cpu["server"] = cpu["server"] + tree_cpu_seconds(pid) if pid else float("nan")
            cpu["fake"] += tree_cpu_seconds(fake_pid)
            cpu["client"] += own_cpu()
            if pid is not None:
                run.peak_rss_mb = peak_rss_mb(pid)

        await asyncio.gather(sampler(), *(worker() for _ in range(clients)))
    inside = [(seconds, why) for t1, seconds, why in done if window[0] <= t1 <= window[1]]
    ms = sorted(1000 * seconds for seconds, why in inside if why is None)
    errors = [why for _, why in inside if why is not None]
    n = len(ms)
    run.n, run.errors, run.seconds = n, len(errors), window[1] - window[0]
    run.error_sample = errors[0] if errors else ""
    run.rps = n / run.seconds
    run.p50_ms, run.p99_ms = percentile(ms, 50), percentile(ms, 99)
    if n:
        run.server_cpu_ms, run.fake_cpu_ms, run.client_cpu_ms = (
            1000 * cpu[k] / n for k in ("server", "fake", "client")
        )


def run_load(target: Target, clients: int, duration: float, warmup: float, fake_pid: int, run: Run) -> None:
    run_loop(load(target, clients, duration, warmup, fake_pid, run))


# -- the setup -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeUpstream:
    """fast_upstream.py, started: its process, the throwaway CA that signed its certificate, and the
    folder holding the `sitecustomize.py` hook that resolves its host names (for a client's PYTHONPATH)."""

    process: Process
    ca: Path
    hook: Path
    port: int

    @property
    def suffix(self) -> str:
        """What a provider's base URL needs after its host name: nothing on 443, else the port."""
        return "" if self.port == 443 else f":{self.port}"


def start_fake_upstream(tmp: Path, port: int | None, env: dict[str, str]) -> FakeUpstream:
    """fast_upstream.py on the providers' host names over TLS (a throwaway CA made in `tmp`), on `port`
    (default 443 when it can be bound), running with `env`; the caller stops its process."""
    ca, cert, key = make_tls(tmp)
    hook = tmp / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK.format(hosts=HOSTS))
    port = pick_port(port)
    cmd = [sys.executable, str(Path(__file__).with_name("fast_upstream.py")), "--port", str(port)]
    cmd += ["--certfile", str(cert), "--keyfile", str(key), "--bfl-key", BFL_KEY, "--replicate-token", REPLICATE_TOKEN]
    fake = Process("fake upstream", cmd, env, tmp / "fake.log").start(lambda: tls_ready(port, ca), timeout=60)
    return FakeUpstream(fake, ca, hook, port)


def gateway_env(env: dict[str, str], fake: FakeUpstream, src: Path | None) -> dict[str, str]:
    """`kontext serve`'s environment pointed at the fake by BFL's and Replicate's keys and base URLs only
    (shipped defaults otherwise), running `src` when given (another checkout's)."""
    gw_env = {
        **env,
        "BFL_API_KEY": BFL_KEY,
        "BFL_BASE_URL": f"https://api.bfl.ai{fake.suffix}",
        "REPLICATE_API_TOKEN": REPLICATE_TOKEN,
        "REPLICATE_BASE_URL": f"https://api.replicate.com{fake.suffix}",
        "SSL_CERT_FILE": str(fake.ca),
        "PYTHONPATH": os.pathsep.join(str(p) for p in (fake.hook, src) if p),
    }
    if fake.suffix:  # off 443 the polling host is no documented origin: name it
        gw_env["KONTEXT_PROVIDER_HOSTS"] = json.dumps({"bfl": [f"https://api.us1.bfl.ai{fake.suffix}"]})
    return gw_env


@contextlib.contextmanager
def started(args: argparse.Namespace, tmp: Path, want_litellm: bool) -> Iterator[dict[str, Any]]:
    """The fake, the gateway and (when wanted) LiteLLM, running; stopped on the way out."""
    env = base_env()
    processes: list[Process] = []
    try:
        upstream = start_fake_upstream(tmp, args.port, env)
        fake, ca, hook, port, suffix = upstream.process, upstream.ca, upstream.hook, upstream.port, upstream.suffix
        processes.append(fake)

        data_dir = tmp / "kontext-data"
        gw_env = gateway_env(env, upstream, args.src)
        gw_port = free_port()
        gateway = Process(
            "kontext", server_command(gw_port, str(data_dir)), gw_env, tmp / "kontext.log", cpus=args.gateway_cpus
        )
        processes.append(gateway.start(http_ready(gw_port, "/health"), timeout=120))

        litellm: Process | None = None
        master_key = "sk-bench-" + secrets.token_hex(24)
        ll_port = free_port()
        if want_litellm:
            config = tmp / "litellm.yaml"
            config.write_text(
                textwrap.dedent(f"""\
                model_list:
                  - model_name: flux-kontext-pro
                    litellm_params:
                      model: black_forest_labs/flux-kontext-pro
                      api_key: {BFL_KEY}
                      api_base: https://api.bfl.ai{suffix}
                general_settings:
                  master_key: {master_key}
                """)
            )
            ll_env = {
                **env,
                "SSL_CERT_FILE": str(ca),
                "PYTHONPATH": str(hook),
                "BFL_API_KEY": BFL_KEY,
                "BFL_API_BASE": f"https://api.bfl.ai{suffix}",
                "LITELLM_TELEMETRY_DISABLED": "true",
                "LITELLM_TELEMETRY": "False",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
            }
            cmd = [str(args.litellm_exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(ll_port)]
            litellm = Process(
                "litellm", [*cmd, "--num_workers", "1"], ll_env, tmp / "litellm.log", cwd=tmp, cpus=args.gateway_cpus
            )
            processes.append(litellm.start(http_ready(ll_port, "/health/liveliness"), timeout=300))
        yield {
            "port": port,
            "ca": ca,
            "fake": fake,
            "gateway": gateway,
            "gateway_url": f"http://127.0.0.1:{gw_port}/v1/images/generations",
            "litellm": litellm,
            "litellm_url": f"http://127.0.0.1:{ll_port}/v1/images/generations",
            "master_key": master_key,
            "data_dir": data_dir,
        }
    finally:
        for p in reversed(processes):
            p.stop()


def targets_for(up: Upstream, setup: dict[str, Any]) -> list[Target]:
    body = {"prompt": PROMPT, "aspect_ratio": "1:1", "output_format": up.fmt}
    out = [
        Target(
            "kontext",
            setup["gateway_url"],
            {},
            {"model": up.gateway_model, **body, "response_format": "url"},
            setup["gateway"],
        )
    ]
    if up.provider == "bfl" and setup["litellm"] is not None:
        headers = {"Authorization": f"Bearer {setup['master_key']}"}
        out.append(
            Target("litellm", setup["litellm_url"], headers, {"model": "flux-kontext-pro", **body}, setup["litellm"])
        )
    if up.provider == "bfl":
        base = "https://api.bfl.ai" + ("" if setup["port"] == 443 else f":{setup['port']}")
        tls = ssl.create_default_context(cafile=str(setup["ca"]))
        out.append(Target("direct", base, {}, body, None, caller=direct_bfl(base, tls)))
    return out


def smoke(targets: list[Target], setup: dict[str, Any]) -> None:
    """One request per target before any timing: fail early, with the logs, when one does not work."""
    with httpx.Client(timeout=60, trust_env=False) as client:
        for t in targets:
            if t.caller is not None:
                continue  # `direct` runs in the load's own loop; its first request tells
            why = check_answer(client.post(t.url, json=t.body, headers=t.headers))
            if why is not None:
                logs = "\n".join(
                    f"--- {p.name} log ---\n{p.tail()}" for p in (setup["fake"], t.process) if p is not None
                )
                sys.exit(f"{t.side} {t.body.get('model')} ({t.body['output_format']}) failed: {why}\n{logs}")


# -- output ----------------------------------------------------------------------------------------------


def fmt(x: float, digits: int = 1) -> str:
    return "-" if x != x else f"{x:.{digits}f}"


def ratio(a: float, b: float) -> str:
    return "-" if a != a or b != b or b == 0 else f"{a / b:.2f}"


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def no_nan(value: Any) -> Any:
    """`value` with every NaN replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value


def print_runs(runs: list[Run]) -> None:
    print(
        "\n| upstream | clients | gateway | repeat | requests | errors | req/s | p50 ms | p99 ms "
        "| gateway CPU-ms/req | fake CPU-ms/req | client CPU-ms/req | peak RSS MiB |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        peak = fmt(r.peak_rss_mb, 0) + ("" if r.peak_reset else " (since start)")
        print(
            f"| {r.upstream} | {r.clients} | {r.side} | {r.repeat + 1} | {r.n} | {r.errors} | {fmt(r.rps)} "
            f"| {fmt(r.p50_ms)} | {fmt(r.p99_ms)} | {fmt(r.server_cpu_ms, 2)} | {fmt(r.fake_cpu_ms, 2)} "
            f"| {fmt(r.client_cpu_ms, 2)} | {peak} |"
        )
    for r in runs:
        if r.errors:
            print(f"  {r.upstream} c={r.clients} {r.side} repeat {r.repeat + 1}: first error: {r.error_sample}")


def print_summary(
    runs: list[Run], upstreams: list[Upstream], clients: list[int], repeats: int, idle: dict[str, float | None]
) -> None:
    print(
        f"\nMedians over {repeats} repeat(s); K = kontext, L = litellm, K/L = ratio "
        "(req/s: above 1 is kontext faster; p50, p99, CPU, RSS: below 1 is kontext cheaper)\n"
    )
    print(
        "| upstream | clients | req/s K | req/s L | K/L | p50 K | p50 L | K/L | p99 K | p99 L | K/L "
        "| CPU-ms/req K | CPU-ms/req L | K/L | peak RSS K | peak RSS L | K/L | errors K | errors L |"
    )
    print("|---|---:|" + "---:|" * 17)
    for up in upstreams:
        for c in clients:
            side: dict[str, dict[str, float]] = {}
            errs: dict[str, str] = {}
            for name in ("kontext", "litellm"):
                mine = [r for r in runs if r.upstream == up.name and r.clients == c and r.side == name]
                side[name] = {
                    k: median([getattr(r, k) for r in mine])
                    for k in ("rps", "p50_ms", "p99_ms", "server_cpu_ms", "peak_rss_mb")
                }
                errs[name] = str(sum(r.errors for r in mine)) if mine else "-"
            k, lite = side["kontext"], side["litellm"]
            cells = [up.name, str(c)]
            for key, digits in (("rps", 1), ("p50_ms", 1), ("p99_ms", 1), ("server_cpu_ms", 2), ("peak_rss_mb", 0)):
                cells += [fmt(k[key], digits), fmt(lite[key], digits), ratio(k[key], lite[key])]
            cells += [errs["kontext"], errs["litellm"]]
            print("| " + " | ".join(cells) + " |")
    direct = [r for r in runs if r.side == "direct" and r.clients == 1]
    if direct:
        print(
            "\nLatency added at one client: p50 over the upstream's own (`direct`: the same three calls made "
            "straight to the fake by aiohttp, same run), medians over the repeats\n"
        )
        print("| upstream | p50 direct | p50 K | added by K | p50 L | added by L | errors direct |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for up in upstreams:
            own = [r for r in direct if r.upstream == up.name]
            if not own:
                continue
            base = median([r.p50_ms for r in own])
            p50 = {
                name: median([r.p50_ms for r in runs if r.upstream == up.name and r.clients == 1 and r.side == name])
                for name in ("kontext", "litellm")
            }
            print(
                f"| {up.name} | {fmt(base)} | {fmt(p50['kontext'])} | {fmt(p50['kontext'] - base)} "
                f"| {fmt(p50['litellm'])} | {fmt(p50['litellm'] - base)} | {sum(r.errors for r in own)} |"
            )
    k_idle, l_idle = idle.get("kontext"), idle.get("litellm")
    if k_idle is not None and l_idle is not None:
        idle_line = f"kontext {k_idle:.0f} MiB, litellm {l_idle:.0f} MiB, K/L {ratio(k_idle, l_idle)}"
        print(f"\nidle RSS after start-up: {idle_line}")


# -- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64], help="client counts (default 1 8 64)")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per run (default 20)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of the same load before each (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument(
        "--upstream",
        nargs="+",
        choices=list(UPSTREAMS),
        default=list(UPSTREAMS),
        help="which results: BFL PNG, BFL JPEG, Replicate PNG (default: all three)",
    )
    ap.add_argument(
        "--litellm-venv",
        type=Path,
        default=ROOT / ".venv-litellm",
        help="LiteLLM's own venv, made with pip install 'litellm[proxy]' when missing (default .venv-litellm)",
    )
    ap.add_argument("--src", type=Path, default=None, help="run the gateway from this src directory (another checkout)")
    ap.add_argument("--port", type=int, default=None, help="the fake's port (default 443 when it can be bound)")
    ap.add_argument("--json", type=Path, default=None, help="write every run (raw) to this JSON file")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="each gateway on CPU 0 alone, the fake and this script's clients on the others: req/s is then "
        "what one core of gateway serves, not what is left of a machine the load shares",
    )
    args = ap.parse_args()
    args.gateway_cpus = None
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        sys.exit("--pin needs two CPUs or more")
    if args.src is not None:
        args.src = args.src.resolve()
        if not (args.src / "kontext_gateway").is_dir():
            sys.exit(f"--src {args.src}: no kontext_gateway package there")

    print(f"machine: {machine()}")
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        args.gateway_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))  # this script, and the fake it starts
        others = ", ".join(map(str, sorted(os.sched_getaffinity(0))))
        print(f"pinned: each gateway on CPU {min(args.gateway_cpus)}; the fake and the clients on CPU {others}")
    watch = CpuWatch()
    upstreams = [UPSTREAMS[name] for name in args.upstream]
    want_litellm = any(up.provider == "bfl" for up in upstreams)
    litellm_version, litellm_replicate = "-", False
    if want_litellm or "replicate-png" in args.upstream:
        args.litellm_exe = ensure_litellm(args.litellm_venv.resolve())
        litellm_version, litellm_replicate = litellm_facts(args.litellm_venv.resolve())
    runs: list[Run] = []
    meta: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kontext-vs-litellm-") as tmp_name:
        tmp = Path(tmp_name)
        with started(args, tmp, want_litellm) as setup:
            fake, gateway, litellm = setup["fake"], setup["gateway"], setup["litellm"]
            base = "https://api.bfl.ai" + ("" if setup["port"] == 443 else f":{setup['port']}")
            print(f"fake upstream: pid {fake.pid}, {base} (https, throwaway CA); {fake.tail(1)}")
            print(
                f"kontext: pid {gateway.pid}, src {args.src or ROOT / 'src'}, up in {gateway.startup_s:.1f} s, "
                f"idle RSS {gateway.idle_rss_mb:.0f} MiB, {len(_children(gateway.pid))} child processes"
            )
            if litellm is not None:
                print(
                    f"litellm {litellm_version}: pid {litellm.pid}, up in {litellm.startup_s:.1f} s, "
                    f"idle RSS {litellm.idle_rss_mb:.0f} MiB, {len(_children(litellm.pid))} child processes "
                    "(CPU and RSS count them)"
                )
            if "replicate-png" in args.upstream:
                if litellm_replicate:
                    print(
                        f"note: LiteLLM {litellm_version} seems to have a Replicate image route; this script "
                        "does not configure it: replicate-png measures kontext alone"
                    )
                else:
                    print(
                        f"note: LiteLLM {litellm_version} has no Replicate image-generation route: "
                        "replicate-png measures kontext alone"
                    )
            meta = {
                "litellm_version": litellm_version,
                "fake_port": setup["port"],
                "src": str(args.src or ROOT / "src"),
                "startup_s": {"kontext": gateway.startup_s, "litellm": litellm.startup_s if litellm else None},
                "idle_rss_mb": {"kontext": gateway.idle_rss_mb, "litellm": litellm.idle_rss_mb if litellm else None},
            }
            exec(HOOK.format(hosts=HOSTS), {})  # `direct` resolves the fake's host names here, as the gateways do
            per_upstream = {up.name: targets_for(up, setup) for up in upstreams}
            for ts in per_upstream.values():
                smoke(ts, setup)
            print(
                f"\n{args.duration:g} s measured after {args.warmup:g} s of warm-up per run, closed loop, "
                f"each client its own connection; {args.repeats} repeat(s)",
                flush=True,
            )
            for rep in range(args.repeats):
                for up in upstreams:
                    for c in args.clients:
                        ts = per_upstream[up.name] if rep % 2 == 0 else per_upstream[up.name][::-1]
                        for t in ts:
                            if t.side == "direct" and c != 1:
                                continue  # the upstream's own latency: one client is what the goal asks
                            run = Run(up.name, c, t.side, rep)
                            run_load(t, c, args.duration, args.warmup, fake.pid, run)
                            runs.append(run)
                            print(
                                f"  repeat {rep + 1} {up.name} c={c} {t.side}: {run.n} ok, {run.errors} errors, "
                                f"{run.rps:.1f} req/s, p50 {fmt(run.p50_ms)} ms, p99 {fmt(run.p99_ms)} ms",
                                flush=True,
                            )
            stored = sum(f.stat().st_size for f in setup["data_dir"].rglob("*") if f.is_file())
            meta["kontext_data_dir_mb"] = stored / 2**20
    print_runs(runs)
    print_summary(runs, upstreams, args.clients, args.repeats, meta.get("idle_rss_mb", {}))
    print(f"\nkontext's data dir held {meta.get('kontext_data_dir_mb', 0):.0f} MiB at the end (results and database)")
    if args.json:
        raw = {"machine": machine(), "args": vars(args), "meta": meta, "runs": [asdict(r) for r in runs]}
        args.json.write_text(json.dumps(no_nan(raw), indent=2, default=str) + "\n")
        print(f"raw runs written to {args.json}")
    print(f"\n{watch.report()}")


if __name__ == "__main__":
    main()
