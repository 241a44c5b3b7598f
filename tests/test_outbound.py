"""Outbound fetches of client-given URLs (input images, webhooks): the connection goes to the address
that was checked (DNS rebinding), TLS still verifies the name, and an image fetch has one deadline.

DNS is faked by patching socket.getaddrinfo (what the gateway and anyio both call); connections to the
made-up public address are refused by patching httpcore's socket backend, so nothing leaves the
machine. The servers are real, on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest

from conftest import PATIENCE_S, png_bytes
from kontext_gateway.config import Settings
from kontext_gateway.errors import GatewayError
from kontext_gateway.gateway import Gateway
from kontext_gateway.net import PinnedTransport, fetch_image
from kontext_gateway.protocol import prediction_call

PUBLIC = "93.184.215.14"  # what the rebinding name answers first; never actually connected to
REAL_GETADDRINFO = socket.getaddrinfo
TINY = "kontext-gateway/kontext-tiny"


# -- fake DNS, recorded connections ------------------------------------------------------------------------


@dataclass
class FakeDNS:
    """Names answer from `answers` in turn (the last answer repeats; none: no such name); other names
    resolve for real."""

    answers: dict[str, list[str]]
    lookups: list[str] = field(default_factory=list)

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kw: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return REAL_GETADDRINFO(host, port, *args, **kw)
        self.lookups.append(name)
        queue = self.answers[name]
        if not queue:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        address = queue.pop(0) if len(queue) > 1 else queue[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, int(port or 0)))]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    fake = FakeDNS({})
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    return fake


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The host of every TCP connection httpx opens; PUBLIC is refused as a host that does not answer."""
    seen: list[str] = []
    real = httpcore.AnyIOBackend.connect_tcp

    async def connect_tcp(
        self: httpcore.AnyIOBackend, host: str, port: int, *args: Any, **kw: Any
    ) -> httpcore.AsyncNetworkStream:
        seen.append(host)
        if host == PUBLIC:
            raise httpcore.ConnectError("the made-up public address is not reachable from the tests")
        return await real(self, host, port, *args, **kw)

    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", connect_tcp)
    return seen


# -- loopback servers ----------------------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def tcp_server(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """Serve `handler` on a free loopback port; its connections are cut when the block ends."""
    tasks: set[asyncio.Task[Any]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
    return head


def answering(status: int, body: bytes, requests: list[bytes], headers: str = "") -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await read_request(reader))
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{headers}connection: close\r\n\r\n".encode() + body
        )
        await writer.drain()

    return handle


@asynccontextmanager
async def gateway(tmp_path: Path, *, run_jobs: bool = False, **overrides: Any) -> AsyncIterator[Gateway]:
    gw = Gateway(Settings(data_dir=tmp_path, **overrides))
    await gw.start(workers=run_jobs)
    try:
        yield gw
    finally:
        await gw.close()


async def estimate_with_image(gw: Gateway, url: str) -> dict[str, Any]:
    """A dry-run prediction with an input image by URL: fetches it, creates nothing."""
    return await gw.predictions.estimate(
        prediction_call(TINY, {"input": {"prompt": "x", "input_image": url}}), base_url="http://gateway.test"
    )


# -- DNS rebinding --------------------------------------------------------------------------------------------


async def test_input_image_name_rebound_to_loopback_is_not_reached(
    tmp_path: Path, dns: FakeDNS, connects: list[str]
) -> None:
    inside: list[bytes] = []
    async with tcp_server(answering(200, png_bytes(32, 32), inside)) as port:
        # Public when the gateway looks, loopback for whoever looks next: the service listening inside.
        dns.answers["rebind.example"] = [PUBLIC, "127.0.0.1"]
        async with gateway(tmp_path) as gw:
            with pytest.raises(GatewayError) as info:
                await estimate_with_image(gw, f"http://rebind.example:{port}/cat.png")
    assert inside == []  # the loopback service never saw a request
    assert connects == [PUBLIC] and dns.lookups == ["rebind.example"]  # one lookup decided where to connect
    err = info.value
    assert (err.status, err.code, err.param) == (400, "image_url_unreachable", "input.input_image")


async def test_input_image_name_that_resolves_inward_is_refused_before_connecting(
    tmp_path: Path, dns: FakeDNS, connects: list[str]
) -> None:
    dns.answers["inward.example"] = ["10.0.0.7"]
    async with gateway(tmp_path) as gw:
        with pytest.raises(GatewayError) as info:
            await estimate_with_image(gw, "http://inward.example/cat.png")
    assert (info.value.status, info.value.code) == (400, "url_not_allowed")
    assert "resolves to 10.0.0.7, a private address" in info.value.message and connects == []


async def test_webhook_name_rebound_to_loopback_is_not_reached(
    tmp_path: Path, dns: FakeDNS, connects: list[str]
) -> None:
    inside: list[bytes] = []
    async with tcp_server(answering(200, b"ok", inside)) as port:
        dns.answers["hooks.example"] = [PUBLIC, "127.0.0.1"]
        fast = {
            "webhook_retry_delays_s": [0.05, 0.05],
            "webhook_retry_jitter": 0.0,
            "webhook_poll_interval_s": 0.05,
            "job_poll_interval_s": 0.05,
            "workers": 1,
        }
        async with gateway(tmp_path, run_jobs=True, **fast) as gw:
            rid = "req_" + uuid.uuid4().hex
            await gw.db.create_request(
                id=rid,
                endpoint="predictions",
                model="kontext-tiny",
                mode="text-to-image",
                params={},
                webhook=f"http://hooks.example:{port}/hook?token=receiver-own",
            )
            await gw.db.mark_failed(rid, error={"message": "boom"}, attempts=[], duration_ms=1)
            record = await gw.db.get_request(rid)
            assert record is not None
            await gw.webhooks.emit(record, "completed")
            deadline = time.monotonic() + PATIENCE_S
            while (row := (await gw.db.list_deliveries(rid))[0]).state in ("pending", "sending"):
                assert time.monotonic() < deadline, row
                await asyncio.sleep(0.02)
    assert inside == []
    # The first try went to the public address it checked (which did not answer); the retry resolved
    # anew, found loopback and dropped the delivery without connecting.
    assert connects == [PUBLIC]
    assert row.state == "dropped" and row.attempts == 2
    assert row.last_error is not None
    assert row.last_error.startswith("url_not_allowed") and "receiver-own" not in row.last_error


async def test_private_addresses_are_pinned_too_when_allowed(dns: FakeDNS, connects: list[str]) -> None:
    seen: list[bytes] = []
    async with tcp_server(answering(200, b"pixels", seen)) as port:
        dns.answers["images.internal"] = ["127.0.0.1", PUBLIC]
        data = await fetch_image(
            f"http://images.internal:{port}/a.png", param="image", allow_private=True, max_bytes=1000, deadline_s=10
        )
    assert data == b"pixels" and connects == ["127.0.0.1"] and dns.lookups == ["images.internal"]
    assert b"\r\nhost: images.internal:" in seen[0].lower()  # the Host header names the name, not the address


# -- TLS keeps verifying the name ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for pinned.example (made with the openssl command)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    try:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=pinned.example",
                "-addext",
                "subjectAltName=DNS:pinned.example",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no openssl to make a test certificate: {exc}")
    return cert, key


async def test_https_connects_to_the_pinned_address_and_verifies_the_name(
    certificate: tuple[Path, Path], dns: FakeDNS, connects: list[str]
) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    sni: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: sni.append(name)  # type: ignore[assignment,misc]
    trusting = ssl.create_default_context(cafile=str(cert))
    seen: list[bytes] = []
    dns.answers.update({"pinned.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    async with tcp_server(answering(200, b"secure", seen), server_tls) as port:
        transport = PinnedTransport(allow_private=True, param="image", status=400, verify=trusting)
        async with httpx.AsyncClient(transport=transport, follow_redirects=False) as client:
            resp = await client.get(f"https://pinned.example:{port}/x")
            assert resp.status_code == 200 and resp.content == b"secure"
            # The same address under a name the certificate does not cover: refused by verification.
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"https://other.example:{port}/x")
    assert connects == ["127.0.0.1", "127.0.0.1"]  # the address, never the name
    assert sni == ["pinned.example", "other.example"]


# -- one deadline per fetch; redirects and size as before ------------------------------------------------------


async def test_trickling_image_server_is_cut_at_the_deadline(tmp_path: Path) -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 1000000\r\n\r\n")
        while True:  # one byte every 0.3 s: each read is quick, the whole never ends
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.3)

    async with tcp_server(trickle) as port, gateway(tmp_path, allow_private_urls=True, fetch_timeout_s=2) as gw:
        started = time.monotonic()
        with pytest.raises(GatewayError) as info:
            async with asyncio.timeout(20):  # before the fix this fetch never ended
                await estimate_with_image(gw, f"http://127.0.0.1:{port}/slow.png")
        elapsed = time.monotonic() - started
    err = info.value
    assert (err.status, err.code, err.param) == (400, "image_url_unreachable", "input.input_image")
    assert "2 s deadline" in err.message and "KONTEXT_FETCH_TIMEOUT_S" in err.message
    assert elapsed < 20


async def test_fetch_refuses_redirects_and_oversized_bodies(dns: FakeDNS) -> None:
    requests: list[bytes] = []
    fetch = {"param": "image", "allow_private": True, "max_bytes": 100, "deadline_s": 10.0}
    async with tcp_server(answering(302, b"", requests, "location: http://10.0.0.1/\r\n")) as port:
        with pytest.raises(GatewayError) as info:
            await fetch_image(f"http://127.0.0.1:{port}/moved", **fetch)
    assert (info.value.status, info.value.code) == (400, "image_url_unreachable") and "HTTP 302" in info.value.message
    assert len(requests) == 1  # the redirect was not followed
    async with tcp_server(answering(200, b"x" * 101, requests)) as port:
        with pytest.raises(GatewayError) as info:
            await fetch_image(f"http://127.0.0.1:{port}/big", **fetch)
    assert (info.value.status, info.value.code) == (413, "file_too_large")


@pytest.mark.parametrize(
    "url,code",
    [
        ("http://[::1]:9/x", "url_not_allowed"),
        ("http://[fe80::1%25eth0]:9/x", "url_not_allowed"),
        ("http://[fec0::1]/x", "url_not_allowed"),
        ("http://0.0.0.0:9/x", "url_not_allowed"),
        ("ftp://example.com/x", "invalid_url"),
        ("http://nowhere.example/x", "invalid_url"),
    ],
)
async def test_fetch_refuses_before_connecting(url: str, code: str, dns: FakeDNS, connects: list[str]) -> None:
    dns.answers["nowhere.example"] = []
    with pytest.raises(GatewayError) as info:
        await fetch_image(url, param="image", allow_private=False, max_bytes=100, deadline_s=10.0)
    assert (info.value.status, info.value.code, info.value.param) == (400, code, "image") and connects == []


def test_lora_downloads_connect_only_to_the_checked_address(dns: FakeDNS, connects: list[str], tmp_path: Path) -> None:
    from kontext_gateway.engine.lora import fetch_url

    dns.answers["lora.rebind.example"] = [PUBLIC, "127.0.0.1"]
    with pytest.raises(GatewayError) as caught:
        fetch_url("http://lora.rebind.example:9/style.safetensors", tmp_path, allow_downloads=True, allow_private=False)
    assert caught.value.status == 400
    assert connects == [PUBLIC] and dns.lookups == ["lora.rebind.example"]
    assert not list(tmp_path.iterdir())
