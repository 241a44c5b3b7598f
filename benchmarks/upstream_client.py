"""What the gateway's upstream HTTP client costs per job, by transport: CPU-ms per submit-poll-download.

One job against BFL is three calls: the submit (POST, JSON), the poll (GET, JSON) and the result's
download (GET, a 1024x1024 photo-like PNG of ~1.7 MB, or BFL's default JPEG of ~0.15 MB), all over TLS.
This runs exactly those calls, in this process, against benchmarks/fast_upstream.py (its own process,
TLS on the providers' host names, resolved to 127.0.0.1 here), the way the gateway's providers make
them (`kontext_gateway.providers.transport.upstream_http`: straight onto aiohttp's connections,
answers as plain data, failures as httpx's exceptions) and, beside it, plain httpx and plain aiohttp.
It measures this process's CPU time per job (the fake's is not counted) at 1 and 16 jobs at once.

    .venv/bin/python benchmarks/upstream_client.py                  # all transports, png and jpeg
    .venv/bin/python benchmarks/upstream_client.py --jobs 2000 --format png
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gateway_vs_litellm import BFL_KEY, HOOK, HOSTS, REPLICATE_TOKEN, Process, base_env, make_tls, pick_port, tls_ready
from kontext_gateway.providers.transport import UpstreamHTTP, upstream_http

Job = Callable[[], Awaitable[int]]


def httpx_job(client: httpx.AsyncClient, base: str, fmt: str) -> Job:
    headers = {"x-key": BFL_KEY}

    async def job() -> int:
        sub = await client.post(
            f"{base}/v1/flux-kontext-pro", json={"prompt": "a lighthouse", "output_format": fmt}, headers=headers
        )
        sub.raise_for_status()
        poll = await client.get(sub.json()["polling_url"], headers=headers)
        poll.raise_for_status()
        async with client.stream("GET", poll.json()["result"]["sample"]) as resp:
            resp.raise_for_status()
            chunks = [chunk async for chunk in resp.aiter_bytes()]
        return len(b"".join(chunks))

    return job


def gateway_job(http: UpstreamHTTP, base: str, fmt: str) -> Job:
    """The calls as the gateway's providers make them (providers/hosted.py): the download without the key."""
    headers = {"x-key": BFL_KEY}

    async def job() -> int:
        body = {"prompt": "a lighthouse", "output_format": fmt}
        sub = await http.send("POST", f"{base}/v1/flux-kontext-pro", headers=headers, json=body)
        assert sub.status_code == 200, sub.status_code
        poll = await http.send("GET", sub.json()["polling_url"], headers=headers)
        assert poll.status_code == 200, poll.status_code
        async with http.stream(poll.json()["result"]["sample"], headers={}) as resp:
            assert resp.status_code == 200, resp.status_code
            chunks = [chunk async for chunk in resp.aiter_bytes()]
        return len(b"".join(chunks))

    return job


def aiohttp_job(session: aiohttp.ClientSession, base: str, fmt: str) -> Job:
    headers = {"x-key": BFL_KEY}

    async def job() -> int:
        body = {"prompt": "a lighthouse", "output_format": fmt}
        async with session.post(f"{base}/v1/flux-kontext-pro", json=body, headers=headers) as sub:
            sub.raise_for_status()
            polling_url = (await sub.json())["polling_url"]
        async with session.get(polling_url, headers=headers) as poll:
            poll.raise_for_status()
            sample = (await poll.json())["result"]["sample"]
        async with session.get(sample) as resp:
            resp.raise_for_status()
            return len(await resp.read())

    return job


async def measure(job: Job, jobs: int, at_once: int) -> tuple[float, float, float]:
    """(CPU-ms per job, jobs/s, p50 ms per job) after a warm-up of 2 * at_once jobs."""
    for _ in range(2):
        await asyncio.gather(*(job() for _ in range(at_once)))
    latencies: list[float] = []
    queue = iter(range(jobs))

    async def lane() -> None:
        for _ in queue:
            t0 = time.perf_counter()
            assert await job() > 1000
            latencies.append(time.perf_counter() - t0)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(at_once)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu / jobs * 1000, jobs / wall, statistics.median(latencies) * 1000


async def run(base: str, ca: Path, fmt: str, jobs: int, at_once: list[int], repeats: int, only: list[str]) -> None:
    async def gateway_client() -> tuple[Job, Callable[[], Awaitable[None]]]:
        http = upstream_http(timeout=httpx.Timeout(60.0, connect=10.0))
        return gateway_job(http, base, fmt), http.aclose

    async def plain_httpx() -> tuple[Job, Callable[[], Awaitable[None]]]:
        client = httpx.AsyncClient(verify=str(ca), limits=httpx.Limits(max_connections=256))
        return httpx_job(client, base, fmt), client.aclose

    async def plain_aiohttp() -> tuple[Job, Callable[[], Awaitable[None]]]:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca)))
        return aiohttp_job(session, base, fmt), session.close

    # --client name -> (the row's label, how to make that client)
    clients = {
        "gateway": ("gateway's client", gateway_client),
        "httpx": ("httpx (httpcore)", plain_httpx),
        "aiohttp": ("aiohttp", plain_aiohttp),
    }
    for n in at_once:
        for name, make in (clients[c] for c in clients if c in only):
            rows = []
            for _ in range(repeats):
                job, close = await make()
                try:
                    rows.append(await measure(job, jobs, n))
                finally:
                    await close()
            cpu, rate, p50 = (statistics.median(col) for col in zip(*rows, strict=True))
            print(f"| {fmt} | {n} | {name} | {cpu:.2f} | {rate:.0f} | {p50:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=600, help="jobs measured per row (default 600)")
    ap.add_argument("--at-once", type=int, nargs="+", default=[1, 16], help="jobs in flight (default 1 16)")
    ap.add_argument("--format", nargs="+", default=["png", "jpeg"], choices=["png", "jpeg"])
    ap.add_argument("--repeats", type=int, default=3, help="medians of this many runs per row (default 3)")
    ap.add_argument(
        "--client",
        nargs="+",
        default=["gateway", "httpx", "aiohttp"],
        choices=["gateway", "httpx", "aiohttp"],
        help="the clients measured (default all three)",
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ca, cert, key = make_tls(tmp)
        port = pick_port(None)
        fake_cmd = [sys.executable, str(Path(__file__).with_name("fast_upstream.py")), "--port", str(port)]
        tls = ["--certfile", str(cert), "--keyfile", str(key)]
        creds = ["--bfl-key", BFL_KEY, "--replicate-token", REPLICATE_TOKEN]
        fake = Process("fake upstream", [*fake_cmd, *tls, *creds], base_env(), tmp / "fake.log")
        fake.start(lambda: tls_ready(port, ca), timeout=60)
        try:
            os.environ["SSL_CERT_FILE"] = str(ca)  # what the gateway's client trusts, as in production
            exec(HOOK.format(hosts=HOSTS), {})  # the providers' host names -> 127.0.0.1, in this process
            base = "https://api.bfl.ai" + ("" if port == 443 else f":{port}")
            print("| result | jobs at once | client | CPU-ms / job | jobs/s | p50 ms |")
            print("|---|---:|---|---:|---:|---:|")
            for fmt in args.format:
                uvloop.run(run(base, ca, fmt, args.jobs, args.at_once, args.repeats, args.client))
        finally:
            fake.stop()


if __name__ == "__main__":
    main()
