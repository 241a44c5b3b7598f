"""Blob store latency and throughput: the local directory against S3-compatible object storage, first
through the store's own interface, then images/s through the gateway.

Usage: .venv/bin/python benchmarks/blob_store.py [--parts stores gateway] [--only local s3]
           [--count 100] [--concurrency 16] [--size-mb 1.5]          (part `stores`)
           [--clients 1 16] [--duration 20] [--warmup 3]             (part `gateway`)

Part `stores`, in this process. Payloads are the size of a 1024x1024 PNG (1.5 MB by default), each one
distinct (content-addressed: the same bytes again would be a different measurement). For each store,
through its async interface as the gateway uses it:

- put / get one at a time: p50 and p99 latency (ms) over `--count` blobs;
- put again of blobs already stored (the local directory skips them; S3 puts them again);
- put / get with `--concurrency` in flight: images/s and MB/s over `--count` blobs;
- this process's CPU per operation (hashing, copying, the client's own work), which is what the
  gateway pays whatever the store's speed.

The S3 store runs against moto's S3 server (tests/fakes/s3.py), started by the script on loopback: a
Python mock that stores objects in memory, so its latency is moto's cost more than S3's. Real S3 adds the
network round trip; a MinIO on the same host sits in between. The local directory writes to a temporary
folder (fsync on every new blob), so its numbers are this disk's.

Part `gateway`: images/s through `kontext serve`, once with each store. One fast upstream fake
(fast_upstream.py, its own uvicorn process, started as gateway_vs_litellm.py does: https on the
providers' production host names with a throwaway CA, a sitecustomize.py on the gateway's PYTHONPATH
that resolves them to 127.0.0.1) answers Replicate's Kontext route at once with a 1024x1024 photo-like
PNG (~1.7 MB, unique per task, so the content-addressed store never deduplicates). For each store a
`kontext serve` of its own (fresh --data-dir, shipped defaults) is pointed at it (REPLICATE_API_TOKEN,
REPLICATE_BASE_URL=https://api.replicate.com, SSL_CERT_FILE); for S3 also
KONTEXT_BLOB_URL=s3://<fresh bucket>/bench and moto's AWS_* variables (the same moto server as part
`stores`). Each store's gateway is checked first: one image, which must come back through its link and
be in that store (for S3: nothing in the data dir's blobs/ folder).

At each client count (`--clients`, default 1 16), each client has its own httpx.AsyncClient with one
connection and runs a closed loop for `--warmup` + `--duration` seconds: POST /v1/images/generations
(model replicate/flux.1-kontext-pro, aspect_ratio 1:1, output_format png, response_format url; the
gateway creates the prediction with `Prefer: wait`, downloads the result, checks it decodes, stores it,
records the request in SQLite and answers with a signed /v1/blobs/ link on itself), then GET of the
returned link once (the gateway reads the image back from its store: a file response for the local
directory, a stream from S3). An image counts when both answer 200 and the link's bytes hash to the
blob id; anything else is an error. What completes inside the measured window counts. Per store and
client count: images/s, p50/p99 of the generate call, p50 of the link fetch, the CPU-ms per image of
the gateway process (its /proc/<pid>/stat, children included) and of moto's server, and errors. After
each run the images stored are deleted (through the store's interface, in this process), so every run
starts with an empty store. The client, the gateway, the fake and moto share the machine's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from common import CpuWatch, _children, free_port, machine, percentile, run_loop, server_command
from gateway_vs_litellm import (
    REPLICATE_TOKEN,
    Process,
    base_env,
    check_answer,
    http_ready,
    start_fake_upstream,
    tree_cpu_seconds,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakes.s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoS3, moto_s3  # noqa: E402
from kontext_gateway.store.blobs import BlobStore, LocalBlobStore  # noqa: E402

MB = 1_000_000
GATEWAY_MODEL = "replicate/flux.1-kontext-pro"
PROMPT = "a red fox in the snow, golden hour, 35 mm photo"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Payloads:
    """Distinct payloads of one size: one random buffer, a counter in its first bytes."""

    def __init__(self, size: int) -> None:
        self.base = os.urandom(size)
        self.n = 0

    def next(self) -> bytes:
        self.n += 1
        return self.n.to_bytes(8, "big") + self.base[8:]


async def sequential(op: Callable[[int], Awaitable[object]], count: int) -> tuple[list[float], float]:
    """Latencies (ms, sorted) of `count` calls one after another, and the CPU-ms per call."""
    times = []
    cpu0 = _cpu()
    for i in range(count):
        t0 = time.perf_counter()
        await op(i)
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times), (_cpu() - cpu0) * 1000 / count


async def concurrent(op: Callable[[int], Awaitable[object]], count: int, concurrency: int) -> tuple[float, float]:
    """(operations/s, CPU-ms per operation) of `count` calls, `concurrency` in flight."""
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await op(i)

    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return count / wall, (_cpu() - cpu0) * 1000 / count


async def measure(name: str, store: BlobStore, count: int, concurrency: int, size: int) -> None:
    payloads = Payloads(size)
    await store.writable()
    for _ in range(5):  # warm-up: connections, folders, thread pools
        await store.get(await store.put(payloads.next(), ext="png"))

    data = [payloads.next() for _ in range(count)]
    ids: list[str] = [""] * count

    async def put(i: int) -> None:
        ids[i] = await store.put(data[i], ext="png")

    async def get(i: int) -> None:
        got = await store.get(ids[i])
        assert got is not None and len(got) == size

    put_ms, put_cpu = await sequential(put, count)
    assert ids[0] == hashlib.sha256(data[0]).hexdigest() + ".png"
    get_ms, get_cpu = await sequential(get, count)
    again_ms, again_cpu = await sequential(put, count)  # the same bytes: stored already

    data = [payloads.next() for _ in range(count)]
    put_rate, put_rate_cpu = await concurrent(put, count, concurrency)
    get_rate, get_rate_cpu = await concurrent(get, count, concurrency)
    await store.delete(*ids)

    mb = size / MB
    print(f"\n{name}: {count} blobs of {mb:.2f} MB")
    print(f"  {'':34} {'p50 ms':>8} {'p99 ms':>8} {'CPU-ms/op':>10}")
    for label, times, cpu in (
        ("put, one at a time", put_ms, put_cpu),
        ("get, one at a time", get_ms, get_cpu),
        ("put of a blob already stored", again_ms, again_cpu),
    ):
        print(f"  {label:34} {percentile(times, 50):8.2f} {percentile(times, 99):8.2f} {cpu:10.2f}")
    print(f"  {'':34} {'images/s':>8} {'MB/s':>8} {'CPU-ms/op':>10}")
    for label, rate, cpu in (
        (f"put, {concurrency} in flight", put_rate, put_rate_cpu),
        (f"get, {concurrency} in flight", get_rate, get_rate_cpu),
    ):
        print(f"  {label:34} {rate:8.1f} {rate * mb:8.1f} {cpu:10.2f}")


@contextmanager
def aws_environment(endpoint: str, access_key: str, secret_key: str, region: str) -> Iterator[None]:
    names = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_REGION": region,
    }
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def s3_store(s3: MotoS3, bucket: str) -> BlobStore:
    from kontext_gateway.store.s3blobs import S3BlobStore

    with aws_environment(s3.url, ACCESS_KEY, SECRET_KEY, REGION):
        return S3BlobStore(f"s3://{bucket}/bench")


async def run_stores(args: argparse.Namespace, s3: MotoS3 | None) -> None:
    size = int(args.size_mb * MB)
    if "local" in args.only:
        with tempfile.TemporaryDirectory(prefix="kontext-blobs-", dir=args.tmp) as tmp:
            await measure(
                f"local directory ({tmp})", LocalBlobStore(Path(tmp) / "blobs"), args.count, args.concurrency, size
            )
    if s3 is not None:
        await measure(f"S3 on moto ({s3.url})", s3_store(s3, s3.new_bucket()), args.count, args.concurrency, size)


# -- part `gateway`: images/s through kontext serve ---------------------------------------------------------


@dataclass
class GatewayRun:
    store: str
    clients: int
    images: int = 0
    errors: int = 0
    error_sample: str = ""
    seconds: float = 0.0
    rate: float = float("nan")
    generate_p50_ms: float = float("nan")
    generate_p99_ms: float = float("nan")
    link_p50_ms: float = float("nan")
    gateway_cpu_ms: float = float("nan")  # per image: the gateway process and its children
    moto_cpu_ms: float = float("nan")  # per image: moto's server (S3 only)
    fake_cpu_ms: float = float("nan")
    client_cpu_ms: float = float("nan")


def moto_pid() -> int | None:
    """The pid of moto's server, a child of this process (started by fakes.s3.moto_s3)."""
    for pid in _children(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"moto.server" in f.read():
                    return pid
        except OSError:
            continue
    return None


def link_problem(r: httpx.Response, blob_id: str) -> str | None:
    """None when the link answered the stored PNG (200, its bytes hash to the blob id), else why not."""
    if r.status_code != 200:
        return f"link: HTTP {r.status_code}: {r.text[:300]}"
    if not r.content.startswith(PNG_MAGIC):
        return f"link: not a PNG ({r.headers.get('content-type')}, {len(r.content)} bytes)"
    if hashlib.sha256(r.content).hexdigest() != blob_id.split(".")[0]:
        return f"link: {len(r.content)} bytes that do not hash to {blob_id}"
    return None


async def drive(
    url: str, clients: int, duration: float, warmup: float, pids: dict[str, int | None], run: GatewayRun
) -> list[str]:
    """`clients` closed loops (generate, then fetch its link), each on its own one-connection client, for
    `warmup` + `duration` seconds; fills `run` from what completed inside the measured window and returns
    the ids of every blob the gateway stored."""
    body = {
        "model": GATEWAY_MODEL,
        "prompt": PROMPT,
        "aspect_ratio": "1:1",
        "output_format": "png",
        "response_format": "url",
    }
    timeout = httpx.Timeout(120.0, connect=10.0)
    done: list[tuple[float, float, float, str | None]] = []  # (completed at, generate s, link s, why or None)
    ids: list[str] = []
    window = [0.0, 0.0]
    cpu: dict[str, float] = {}
    t_start = time.perf_counter() + warmup
    t_end = t_start + duration

    def cpu_now() -> dict[str, float]:
        out = {name: tree_cpu_seconds(pid) for name, pid in pids.items() if pid is not None}
        return out | {"client": _cpu()}

    async def client_loop() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                generate = link = float("nan")
                why: str | None
                try:
                    r = await client.post(url, json=body)
                    t1 = time.perf_counter()
                    generate = t1 - t0
                    why = check_answer(r)
                    if why is None:
                        link_url = r.json()["data"][0]["url"]
                        blob_id = urlsplit(link_url).path.rsplit("/", 1)[-1]
                        ids.append(blob_id)
                        got = await client.get(link_url)
                        link = time.perf_counter() - t1
                        why = link_problem(got, blob_id)
                except httpx.HTTPError as exc:
                    why = f"{type(exc).__name__}: {exc}"
                done.append((time.perf_counter(), generate, link, why))

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        cpu.update({name: -value for name, value in cpu_now().items()})
        window[0] = time.perf_counter()
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        window[1] = time.perf_counter()
        for name, value in cpu_now().items():
            cpu[name] += value

    await asyncio.gather(sampler(), *(client_loop() for _ in range(clients)))
    inside = [d for d in done if window[0] <= d[0] <= window[1]]
    good = [d for d in inside if d[3] is None]
    errors = [why for *_, why in inside if why is not None]
    n = len(good)
    run.images, run.errors, run.seconds = n, len(errors), window[1] - window[0]
    run.error_sample = errors[0] if errors else ""
    run.rate = n / run.seconds
    generate_ms = sorted(1000 * d[1] for d in good)
    run.generate_p50_ms, run.generate_p99_ms = percentile(generate_ms, 50), percentile(generate_ms, 99)
    run.link_p50_ms = percentile(sorted(1000 * d[2] for d in good), 50)
    if n:
        per_image = {name: 1000 * value / n for name, value in cpu.items()}
        run.gateway_cpu_ms = per_image["gateway"]
        run.moto_cpu_ms = per_image.get("moto", float("nan"))
        run.fake_cpu_ms, run.client_cpu_ms = per_image["fake"], per_image["client"]
    return ids


@contextmanager
def fast_fake(tmp: Path) -> Iterator[tuple[Process, dict[str, str]]]:
    """fast_upstream.py on the providers' host names (https, a throwaway CA), and the environment that
    points a gateway at it (no KONTEXT_*, provider or AWS_* variable of this machine's)."""
    env = {k: v for k, v in base_env().items() if not k.upper().startswith("AWS_")}
    upstream = start_fake_upstream(tmp, None, env)
    fake, ca, hook, suffix = upstream.process, upstream.ca, upstream.hook, upstream.suffix
    gw_env = {
        **env,
        "REPLICATE_API_TOKEN": REPLICATE_TOKEN,
        "REPLICATE_BASE_URL": f"https://api.replicate.com{suffix}",
        "SSL_CERT_FILE": str(ca),
        "PYTHONPATH": str(hook),
    }
    if suffix:  # off 443 the delivery host's origin is no documented one: name it
        gw_env["KONTEXT_PROVIDER_HOSTS"] = json.dumps({"replicate": [f"https://replicate.delivery{suffix}"]})
    try:
        yield fake, gw_env
    finally:
        fake.stop()


def check_gateway(url: str, gateway: Process, fake: Process, store: BlobStore, other: Path | None) -> str:
    """One image before any timing: it must come back through its link and be in `store` (and not in the
    local folder `other`); exits with the logs when not. Returns its blob id."""
    why: str | None
    blob_id = ""
    with httpx.Client(timeout=60, trust_env=False) as client:
        body = {"model": GATEWAY_MODEL, "prompt": PROMPT, "output_format": "png", "response_format": "url"}
        r = client.post(url, json=body)
        why = check_answer(r)
        if why is None:
            link = r.json()["data"][0]["url"]
            blob_id = urlsplit(link).path.rsplit("/", 1)[-1]
            why = link_problem(client.get(link), blob_id)
            if why is None and not asyncio.run(store.exists(blob_id)):
                why = f"{blob_id} is not in {store!r}"
            if why is None and other is not None and any(f.is_file() for f in other.rglob("*")):
                why = f"the gateway wrote blobs to {other}: KONTEXT_BLOB_URL was not used"
    if why is not None:
        logs = "\n".join(f"--- {p.name} log ---\n{p.tail()}" for p in (fake, gateway))
        sys.exit(f"the gateway's first image failed: {why}\n{logs}")
    return blob_id


def run_gateway(args: argparse.Namespace, s3: MotoS3 | None) -> list[GatewayRun]:
    runs: list[GatewayRun] = []
    with tempfile.TemporaryDirectory(prefix="kontext-blobs-gw-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        with fast_fake(tmp) as (fake, gw_env):
            print(f"\nthrough the gateway: fake upstream pid {fake.pid} ({fake.tail(1)})")
            for name in args.only:
                data_dir = tmp / f"kontext-{name}"
                env = dict(gw_env)
                other: Path | None = None
                if name == "s3":
                    assert s3 is not None
                    bucket = s3.new_bucket()
                    env |= s3.env() | {"KONTEXT_BLOB_URL": f"s3://{bucket}/bench"}
                    store, label, other = s3_store(s3, bucket), f"S3 on moto (s3://{bucket}/bench)", data_dir / "blobs"
                else:
                    store, label = LocalBlobStore(data_dir / "blobs"), f"local directory ({data_dir / 'blobs'})"
                port = free_port()
                cmd = server_command(port, str(data_dir))
                gateway = Process("kontext", cmd, env, tmp / f"kontext-{name}.log").start(
                    http_ready(port, "/health"), timeout=120
                )
                try:
                    url = f"http://127.0.0.1:{port}/v1/images/generations"
                    run_loop(store.delete(check_gateway(url, gateway, fake, store, other)))
                    print(f"{label}: kontext pid {gateway.pid}, up in {gateway.startup_s:.1f} s", flush=True)
                    pids = {"gateway": gateway.pid, "fake": fake.pid, "moto": moto_pid() if name == "s3" else None}
                    for clients in args.clients:
                        run = GatewayRun(name, clients)
                        ids = run_loop(drive(url, clients, args.duration, args.warmup, pids, run))
                        run_loop(store.delete(*ids))
                        runs.append(run)
                        print(
                            f"  {name} c={clients}: {run.images} images, {run.errors} errors, {run.rate:.1f} images/s, "
                            f"generate p50 {run.generate_p50_ms:.1f} ms; CPU-ms/image: fake {run.fake_cpu_ms:.1f}, "
                            f"client {run.client_cpu_ms:.1f}",
                            flush=True,
                        )
                finally:
                    gateway.stop()
    return runs


def print_gateway(runs: list[GatewayRun], duration: float, warmup: float) -> None:
    def f(x: float, digits: int = 1) -> str:
        return "-" if x != x else f"{x:.{digits}f}"

    print(
        f"\nimages/s through the gateway: {duration:g} s measured after {warmup:g} s of warm-up, closed loop, "
        "one connection per client; generate = POST /v1/images/generations, link = GET of its URL\n"
    )
    print(
        "| store | clients | images | images/s | generate p50 ms | generate p99 ms | link p50 ms "
        "| gateway CPU-ms/image | moto CPU-ms/image | errors |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(
            f"| {r.store} | {r.clients} | {r.images} | {f(r.rate)} | {f(r.generate_p50_ms)} | {f(r.generate_p99_ms)} "
            f"| {f(r.link_p50_ms)} | {f(r.gateway_cpu_ms)} | {f(r.moto_cpu_ms)} | {r.errors} |"
        )
    for r in runs:
        if r.errors:
            print(f"  {r.store} c={r.clients}: first error: {r.error_sample}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["stores", "gateway"],
        default=["stores", "gateway"],
        help="stores: the stores' interface in this process; gateway: images/s through kontext serve (default both)",
    )
    parser.add_argument("--only", nargs="+", choices=["local", "s3"], default=["local", "s3"], help="stores to measure")
    parser.add_argument("--count", type=int, default=100, help="stores: blobs per measurement (default 100)")
    parser.add_argument("--concurrency", type=int, default=16, help="stores: operations in flight (default 16)")
    parser.add_argument("--size-mb", type=float, default=1.5, help="stores: payload size in MB (default 1.5)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16], help="gateway: client counts (default 1 16)")
    parser.add_argument("--duration", type=float, default=20.0, help="gateway: measured seconds per run (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="gateway: seconds of load before each (default 3)")
    parser.add_argument("--tmp", default=None, help="folder for the local store (default: the system's temp)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    watch = CpuWatch()
    runs: list[GatewayRun] = []
    with moto_s3() if "s3" in args.only else _nothing() as s3:
        if "stores" in args.parts:
            asyncio.run(run_stores(args, s3))
        if "gateway" in args.parts:
            runs = run_gateway(args, s3)
    if runs:
        print_gateway(runs, args.duration, args.warmup)
    print(f"\n{watch.report()}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
