"""Shared fixtures: a real gateway on loopback (uvicorn in a thread) and the official OpenAI client;
for a provider's own tests, its fake on loopback with a gateway whose only upstream it is
(`upstream_fixtures`).

Tests never bet on how fast a machine is. A test that waits for something bound to happen polls for it
with `wait_until` (or `await_until`), which returns as soon as it holds and gives up only after
PATIENCE_S; a client that goes away mid-request does so at a known point (`post_and_hang_up`), not
after a guessed timeout; and clocks that decide an outcome (leases, breakers, throttles) are moved by
the test rather than waited out.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import io
import json
import mmap
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from fakes.common import serve
from kontext_gateway.api.app import create_app
from kontext_gateway.config import Settings
from kontext_gateway.store.records import ENDED, RequestRow

if TYPE_CHECKING:
    from openai import OpenAI

    from fakes.s3 import MotoS3
    from fakes.upstreams import Upstreams
    from kontext_gateway.engine.pipeline import KontextEngine
    from kontext_gateway.store.db import Database

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
# The longest a test waits for what is bound to happen. Generous: the waits end as soon as it has
# happened, so this costs nothing when all is well, and a busy machine is slow, not wrong.
PATIENCE_S = 60.0


def wait_until(condition: Callable[[], object], timeout: float = PATIENCE_S, interval: float = 0.05) -> bool:
    """Whether `condition()` came true within `timeout` seconds; returns as soon as it does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


async def enqueue_job(db: Database, **kw: object) -> str:
    """A job row as the API writes one (text-to-image, no parameters), with `kw` for `create_request`;
    its id."""
    rid = f"req_{uuid.uuid4().hex}"
    await db.create_request(id=rid, endpoint="images.generations", model="m", mode="text-to-image", params={}, **kw)  # type: ignore[arg-type]
    return rid


async def next_in(queue: asyncio.Queue[str]) -> str:
    """The next item put in `queue`, waited for patiently."""
    return await asyncio.wait_for(queue.get(), PATIENCE_S)


async def ended_request(db: Database, rid: str) -> RequestRow:
    """The request's row once its job has ended (wherever it ran), read every 50 ms, waited for patiently."""
    async with asyncio.timeout(PATIENCE_S):
        while True:
            row = await db.get_request(rid)
            if row is not None and row.status in ENDED:
                return row
            await asyncio.sleep(0.05)


async def await_until(condition: Callable[[], object], timeout: float = PATIENCE_S, interval: float = 0.02) -> bool:
    """`wait_until` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


def post_and_hang_up(base_url: str, path: str, body: dict[str, Any], *, once: Callable[[], object]) -> None:
    """A client that goes away mid-request: POST `body` as JSON, then close the connection unanswered as
    soon as `once()` holds (the work is under way). Not a short client timeout: on a busy machine that
    can run out before the gateway has even started the work."""
    where = urlsplit(base_url)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection((where.hostname, where.port), timeout=PATIENCE_S) as conn:
        conn.sendall(head.encode() + data)
        assert wait_until(once), f"POST {path}: the work never got under way"


@contextmanager
def running_server(settings: Settings) -> Iterator[str]:
    """Start the real gateway under uvicorn on a free loopback port; yield its base URL."""
    with serve(create_app(settings)) as url:
        yield url


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path | None = None, timeout: float = 60) -> None:
    """Until a `kontext serve` process answers /health; fails with its log if it exits or hangs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            output = log.read_text() if log is not None and log.exists() else ""
            raise AssertionError(f"the gateway at {url} did not start: {output[-2000:]}")
        time.sleep(0.1)


def start_kontext(
    args: list[str], env: dict[str, str], log: Path, *, unset: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """`kontext ARGS` in the background with this environment plus `env` (less the `unset` names), its
    output in `log`: a file, not a pipe nobody reads (it could fill). Stop it with fakes.common.stop."""
    machine = {k: v for k, v in os.environ.items() if k not in unset}
    with open(log, "ab") as stderr:  # the process keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "kontext_gateway", *args],
            env={**machine, **env},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


@contextmanager
def throwaway_postgres_database(prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432, dropped afterwards; skips the test with the
    reason when PostgreSQL is not reachable."""
    reason = postgres_reachable()
    if reason:
        pytest.skip(reason)
    import asyncio

    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres", timeout=PATIENCE_S)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def reachable(name: str, port: int) -> str | None:
    """None when a local service answers on 127.0.0.1:`port`, else the reason it does not (a skip reason)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return None
    except OSError as exc:
        return f"{name} not reachable at 127.0.0.1:{port} ({exc})"


def postgres_reachable() -> str | None:
    return reachable("PostgreSQL", 5432)


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The module's tests once on SQLite and once on a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'kontext.db'}"
        return
    with throwaway_postgres_database("kontext_" + request.module.__name__.removeprefix("test_")) as url:
        yield url


@pytest.fixture(scope="module")
def engine() -> KontextEngine:
    """kontext-tiny on the CPU, built once per module (a module may override it)."""
    from kontext_gateway.engine.pipeline import KontextEngine

    return KontextEngine.tiny("cpu")


def digest(images: list[Image.Image]) -> str:
    """One SHA-256 over the pixels of a list of images: equal digests, identical pictures."""
    h = hashlib.sha256()
    for im in images:
        h.update(im.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    """The four upstream fakes, each served on its own loopback port (one set per test module)."""
    from contextlib import ExitStack

    from fakes.upstreams import Upstreams

    ups = Upstreams()
    with ExitStack() as stack:
        for name, fake in ups.all.items():
            ups.urls[name] = stack.enter_context(serve(fake.app))
        yield ups


def sdk_for(base_url: str, key: str = "x") -> OpenAI:
    """The official SDK, unchanged, pointed at a gateway; no retries, so a test sees every failure."""
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)


def upstream_fixtures(provider: str, make_fake: Callable[[], Any], **overrides: Any) -> tuple[Any, ...]:
    """The fixtures of a module that tests one provider against its fake, to be bound by these names:

        fake, fake_url, gateway, client, _reset = upstream_fixtures("bfl", FakeBFL, provider_concurrency=...)

    `fake` (made once by `make_fake`), `fake_url` (it, served on loopback), `gateway` (the URL of a gateway
    whose only upstream it is: fakes.upstreams.solo_settings with `overrides`, the fake's other hosts,
    e.g. BFL's polling cluster, in `provider_hosts`), the SDK pointed at that gateway (any name), and
    `_reset`, autouse: the fake as made again before and after every test."""

    @pytest.fixture(scope="module")
    def fake() -> Any:
        return make_fake()

    @pytest.fixture(scope="module")
    def fake_url(fake: Any) -> Iterator[str]:
        with serve(fake.app) as url:
            yield url

    @pytest.fixture(scope="module")
    def gateway(fake: Any, fake_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        from fakes.upstreams import solo_settings

        data_dir = tmp_path_factory.mktemp(f"{provider}-gateway")
        storage = {"fal_storage_url": fake.storage_url} if getattr(fake, "storage_url", None) else {}
        settings = solo_settings(provider, data_dir, fake_url, hosts=fake.other_origins, **{**storage, **overrides})
        with running_server(settings) as url:
            yield url

    @pytest.fixture(scope="module")
    def client(gateway: str) -> Iterator[OpenAI]:
        with sdk_for(gateway) as sdk:
            yield sdk

    @pytest.fixture(autouse=True)
    def _reset(fake: Any) -> Iterator[None]:
        fake.reset()
        yield
        fake.reset()

    return fake, fake_url, gateway, client, _reset


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-data")


@pytest.fixture(scope="session")
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'gateway.db'}")


@pytest.fixture(scope="session")
def base_url(settings: Settings) -> Iterator[str]:
    with running_server(settings) as url:
        yield url


@pytest.fixture(scope="session")
def client(base_url: str) -> Iterator[OpenAI]:
    with sdk_for(base_url, key="not-needed") as sdk:  # no key is needed on loopback
        yield sdk


@pytest.fixture(scope="session")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (width, height), color)
    # A gradient so resizing and encoding have something to work on.
    for x in range(0, width, max(1, width // 16)):
        for y in range(height):
            img.putpixel((x, y), (x * 255 // max(1, width), y * 255 // max(1, height), 128))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress (random pixels, about 3 bytes each): a large input of a known size."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buf, "PNG")
    return buf.getvalue()


def open_image(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def cached_pages(path: Path) -> tuple[int, int]:
    """(pages of the file in the kernel's page cache, pages of the file), by mincore(2) on a mapping of
    it: what a store left in memory after writing it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            flags = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, flags) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(f & 1 for f in flags), pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def skip_unless_pages_can_be_dropped(folder: Path) -> None:
    """Skip, saying why, where a file's cached pages cannot be dropped and seen dropped: no
    posix_fadvise (macOS), or a filesystem that keeps them (tmpfs: the pages are the file)."""
    if not hasattr(os, "posix_fadvise") or not sys.platform.startswith("linux"):
        pytest.skip("dropping a file's cached pages needs posix_fadvise and mincore (Linux)")
    probe = folder / "page-cache-probe"
    probe.write_bytes(os.urandom(64 * 1024))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left, _ = cached_pages(probe)
    probe.unlink()
    if left:
        pytest.skip(f"the filesystem under {folder} keeps a file's pages after POSIX_FADV_DONTNEED (tmpfs?)")


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoS3]:
    """moto's S3 server (fakes/s3.py) for the session; the tests that use it skip, saying why, when it
    cannot start."""
    from contextlib import ExitStack

    from fakes.s3 import MotoUnavailable, moto_s3

    with ExitStack() as stack:
        try:
            server = stack.enter_context(moto_s3())
        except MotoUnavailable as exc:
            pytest.skip(str(exc))
        yield server


@contextmanager
def aws_env(s3: MotoS3, endpoint: str | None = None) -> Iterator[None]:
    """The process environment a gateway reads to reach `s3` (or `endpoint`), as an operator would set
    it; restored afterwards. Variables that would shadow these are removed meanwhile."""
    from fakes.s3 import SHADOWING

    with pytest.MonkeyPatch.context() as mp:
        for name in SHADOWING:
            mp.delenv(name, raising=False)
        for name, value in s3.env(endpoint).items():
            mp.setenv(name, value)
        yield
