"""The upstream calls (`UpstreamHTTP`): what a provider's code sees for each way an upstream can answer or
fail, the same from the gateway's client on aiohttp's connections as from httpx's own transport.

The upstream is a scripted HTTP/1.1 server on loopback (asyncio streams), so it can misbehave at the
byte level: close without answering, cut a body short, send a broken status line, never answer."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from conftest import noise_png, png_bytes
from kontext_gateway.imaging import inspect_image
from kontext_gateway.providers.transport import (
    AiohttpUpstream,
    AnswerTooLarge,
    HttpxUpstream,
    UpstreamHTTP,
    upstream_http,
)

Script = Callable[["Seen", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Seen:
    """What the scripted upstream saw: one entry per connection, the requests on each."""

    connections: int = 0
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)


async def read_request(seen: Seen, reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed an idle connection
    line, *fields = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    seen.requests.append((line, headers, body))
    return line, headers, body


def answer(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@contextlib.asynccontextmanager
async def upstream(script: Script) -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        try:
            await script(seen, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


def serving(respond: Callable[[str, dict[str, str], bytes], bytes]) -> Script:
    """A keep-alive upstream answering each request with `respond(request line, headers, body)`."""

    async def script(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(seen, reader)) is not None:
            writer.write(respond(*request))
            await writer.drain()

    return script


@pytest.fixture(params=["aiohttp", "httpx"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[UpstreamHTTP]:
    """The gateway's client, and the same calls through httpx's own transport (the reference)."""
    timeout = httpx.Timeout(5.0, connect=2.0)
    c: UpstreamHTTP = (
        upstream_http(timeout=timeout)
        if request.param == "aiohttp"
        else HttpxUpstream(httpx.AsyncHTTPTransport(), timeout=timeout)
    )
    try:
        yield c
    finally:
        await c.aclose()


async def test_json_calls_reuse_one_connection_and_send_what_httpx_builds(client: UpstreamHTTP) -> None:
    def respond(line: str, headers: dict[str, str], body: bytes) -> bytes:
        return answer("200 OK", json.dumps({"line": line, "got": json.loads(body or b"null")}).encode())

    async with upstream(serving(respond)) as (url, seen):
        first = await client.send(
            "POST", f"{url}/v1/flux-kontext-pro?x=1", json={"prompt": "ü"}, headers={"x-key": "k"}
        )
        second = await client.send("GET", f"{url}/v1/get_result?id=abc", headers={})
    assert first.status_code == 200 and first.json() == {
        "line": "POST /v1/flux-kontext-pro?x=1 HTTP/1.1",
        "got": {"prompt": "ü"},
    }
    assert second.json()["line"] == "GET /v1/get_result?id=abc HTTP/1.1"
    assert seen.connections == 1  # kept alive between calls
    _, headers, body = seen.requests[0]
    assert headers["x-key"] == "k" and headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body)) and "transfer-encoding" not in headers
    assert headers["host"] == url.removeprefix("http://")


async def test_a_multipart_upload_arrives_whole_with_its_length(client: UpstreamHTTP) -> None:
    image = png_bytes(64, 48)
    async with upstream(serving(lambda *_: answer("201 Created", b"{}"))) as (url, seen):
        resp = await client.send(
            "POST",
            f"{url}/v1/files",
            headers={},
            files={"content": ("a.png", image, "image/png")},
            data={"type": "image/png"},
        )
    assert resp.status_code == 201
    _, headers, body = seen.requests[0]
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    assert int(headers["content-length"]) == len(body) and image in body


async def test_a_large_result_streams_back_byte_for_byte(client: UpstreamHTTP) -> None:
    image = noise_png(1024, 1024)
    script = serving(lambda *_: answer("200 OK", image, "content-type: image/png"))
    async with upstream(script) as (url, _), client.stream(f"{url}/results/a/sample.png", headers={}) as resp:
        data = b"".join([chunk async for chunk in resp.aiter_bytes()])
    assert data == image
    assert inspect_image(data, param="output", max_pixels=2**24) == ("png", (1024, 1024))


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_a_result_sent_in_chunks_streams_back_byte_for_byte(client: UpstreamHTTP, encoding: str) -> None:
    image = noise_png(512, 512)
    wire = gzip.compress(image) if encoding == "gzip" else image
    script = serving(lambda *_: chunked(wire, "content-type: image/png", f"content-encoding: {encoding}"))
    async with upstream(script) as (url, _), client.stream(f"{url}/results/a/sample.png", headers={}) as resp:
        pieces = [chunk async for chunk in resp.aiter_bytes()]
    assert b"".join(pieces) == image
    assert inspect_image(b"".join(pieces), param="output", max_pixels=2**24) == ("png", (512, 512))


async def test_a_chunk_whose_end_comes_after_its_data_adds_no_empty_piece(client: UpstreamHTTP) -> None:
    # Each chunk's closing CRLF sent a moment after its data: the reader has taken the data by the
    # time the chunk's end is parsed, and that end must not come out as an empty piece.
    parts = [bytes([n]) * 1000 for n in range(1, 6)]

    async def script(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(seen, reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in parts:
            writer.write(f"{len(part):x}\r\n".encode() + part)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with upstream(script) as (url, _), client.stream(f"{url}/results/a/sample.bin", headers={}) as resp:
        pieces = [chunk async for chunk in resp.aiter_bytes()]
    assert b"".join(pieces) == b"".join(parts)
    assert all(pieces)


async def test_content_encoding_is_decoded_once(client: UpstreamHTTP) -> None:
    body = json.dumps({"status": "Ready"}).encode()
    zipped = gzip.compress(body)
    async with upstream(serving(lambda *_: answer("200 OK", zipped, "content-encoding: gzip"))) as (url, _):
        resp = await client.send("GET", f"{url}/v1/get_result?id=a", headers={})
    assert resp.json() == {"status": "Ready"}


CAP = 64 * 1024  # a small answer cap for the tests below (the shipped one is 16 MiB)


@pytest.fixture(params=["aiohttp", "httpx"])
async def capped(request: pytest.FixtureRequest) -> AsyncIterator[UpstreamHTTP]:
    """Both clients, their answers capped at CAP bytes."""
    timeout = httpx.Timeout(5.0, connect=2.0)
    c: UpstreamHTTP = (
        AiohttpUpstream(timeout=timeout, max_connections=8, max_answer_bytes=CAP)
        if request.param == "aiohttp"
        else HttpxUpstream(httpx.AsyncHTTPTransport(), timeout=timeout, max_answer_bytes=CAP)
    )
    try:
        yield c
    finally:
        await c.aclose()


def chunked(body: bytes, *headers: str) -> bytes:
    """An answer without a declared length: its body in chunks of 16 KiB."""
    head = ["HTTP/1.1 200 OK", "transfer-encoding: chunked", *headers]
    parts = [body[i : i + 16384] for i in range(0, len(body), 16384)]
    framed = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"
    return ("\r\n".join(head) + "\r\n\r\n").encode() + framed


async def test_an_answer_declared_over_the_cap_is_refused_before_its_body(capped: UpstreamHTTP) -> None:
    async def script(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(seen, reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n{")
        await writer.drain()
        await asyncio.sleep(30)  # the rest never comes: a client that waited for it would time out

    async with upstream(script) as (url, _):
        with pytest.raises(AnswerTooLarge, match="over 65,536 bytes"):
            await capped.send("GET", f"{url}/v1/get_result?id=a", headers={})


async def test_an_answer_that_grows_past_the_cap_is_refused(capped: UpstreamHTTP) -> None:
    fits, over = b"x" * CAP, b"x" * (CAP + 1)
    async with upstream(serving(lambda line, *_: chunked(over if "over" in line else fits))) as (url, _):
        assert (await capped.send("GET", f"{url}/fits", headers={})).content == fits
        with pytest.raises(AnswerTooLarge):
            await capped.send("GET", f"{url}/over", headers={})


async def test_the_cap_counts_an_answer_as_decoded(capped: UpstreamHTTP) -> None:
    bomb = gzip.compress(b"{" + b" " * (4 * CAP) + b"}")  # a few hundred bytes on the wire
    async with upstream(serving(lambda *_: answer("200 OK", bomb, "content-encoding: gzip"))) as (url, _):
        with pytest.raises(AnswerTooLarge):
            await capped.send("GET", f"{url}/v1/get_result?id=a", headers={})


async def test_redirects_are_answers_to_calls_and_followed_by_downloads(client: UpstreamHTTP) -> None:
    def respond(line: str, headers: dict[str, str], body: bytes) -> bytes:
        if line.startswith("GET /old"):
            return answer("302 Found", b"", "location: /new?" + "s" * 20_000)  # a long signed URL
        if line.startswith("GET /new"):
            return answer("303 See Other", b"", "location: http://" + headers["host"] + "/final")
        return answer("200 OK", b"here")

    async with upstream(serving(respond)) as (url, seen):
        unfollowed = await client.send("GET", f"{url}/old", headers={"x-request-id": "r1"})
        async with client.stream(f"{url}/old", headers={"x-request-id": "r2"}) as followed:
            data = b"".join([chunk async for chunk in followed.aiter_bytes()])
    assert unfollowed.status_code == 302 and unfollowed.headers["location"].startswith("/new?sss")
    assert followed.status_code == 200 and data == b"here" and followed.url == f"{url}/final"
    assert [line.split("?")[0] for line, _, _ in seen.requests] == ["GET /old HTTP/1.1"] * 2 + [
        "GET /new",
        "GET /final HTTP/1.1",
    ]
    assert [h["x-request-id"] for _, h, _ in seen.requests] == ["r1", "r2", "r2", "r2"]
    assert seen.connections == 1  # each redirect's answer was read off the connection, which was reused


async def test_a_download_that_redirects_forever_stops(client: UpstreamHTTP) -> None:
    loop = serving(lambda *_: answer("307 Temporary Redirect", b"", "location: /again"))
    async with upstream(loop) as (url, seen):
        with pytest.raises(httpx.TooManyRedirects):
            async with client.stream(f"{url}/start", headers={}):
                pass
    assert len(seen.requests) == client.max_redirects + 1


async def test_a_download_redirected_to_a_broken_location_is_a_protocol_error(client: UpstreamHTTP) -> None:
    broken = serving(lambda *_: answer("302 Found", b"", "location: http://[::1"))
    async with upstream(broken) as (url, _):
        with pytest.raises(httpx.RemoteProtocolError, match="location"):
            async with client.stream(f"{url}/start", headers={}):
                pass


async def test_every_call_says_who_calls_unless_it_says_otherwise(client: UpstreamHTTP) -> None:
    async with upstream(serving(lambda *_: answer("200 OK", b"{}"))) as (url, seen):
        await client.send("GET", f"{url}/v1/get_result", headers={})
        await client.send("GET", f"{url}/v1/get_result", headers={"User-Agent": "mine", "accept": "image/*"})
    (_, plain, _), (_, own, _) = seen.requests
    assert plain["user-agent"].startswith("kontext-gateway/") and plain["accept-encoding"] == "gzip, deflate"
    assert own["user-agent"] == "mine" and own["accept"] == "image/*"


async def test_a_refused_connection_is_a_connect_error(client: UpstreamHTTP) -> None:
    async with upstream(serving(lambda *_: b"")) as (url, _):
        pass  # closed: nothing listens on its port any more
    with pytest.raises(httpx.ConnectError):
        await client.send("GET", f"{url}/v1/get_result", headers={})


async def test_a_close_without_an_answer_is_a_protocol_error(client: UpstreamHTTP) -> None:
    async def hang_up(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(seen, reader)

    async with upstream(hang_up) as (url, _):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.send("POST", f"{url}/v1/flux-kontext-pro", headers={}, json={})


def cut_short(declared: int, sent: int) -> Script:
    """An upstream that answers `declared` bytes of body, sends `sent` of them and closes."""

    async def script(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(seen, reader)
        writer.write(f"HTTP/1.1 200 OK\r\ncontent-length: {declared}\r\n\r\n".encode() + b"x" * sent)
        await writer.drain()

    return script


async def test_a_body_cut_short_is_a_protocol_error(client: UpstreamHTTP) -> None:
    async with upstream(cut_short(5000, 100)) as (url, _):
        with pytest.raises(httpx.RemoteProtocolError, match=r"5000|content length|complete"):
            await client.send("GET", f"{url}/results/a/sample.png", headers={})


async def test_a_download_cut_short_is_a_protocol_error(client: UpstreamHTTP) -> None:
    async with upstream(cut_short(500_000, 100_000)) as (url, _):
        received = []
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream(f"{url}/results/a/sample.png", headers={}) as resp:
                async for chunk in resp.aiter_bytes():
                    received.append(chunk)
    assert sum(map(len, received)) <= 100_000  # what arrived, never more, never passed off as whole


async def test_a_broken_status_line_is_a_protocol_error(client: UpstreamHTTP) -> None:
    async def garbage(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(seen, reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async with upstream(garbage) as (url, _):
        with pytest.raises(httpx.RemoteProtocolError):
            await client.send("GET", f"{url}/v1/get_result", headers={})


async def test_an_upstream_that_never_answers_is_a_read_timeout() -> None:
    async def silent(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(seen, reader)
        await asyncio.sleep(30)

    quick = upstream_http(timeout=httpx.Timeout(0.3, connect=2.0))
    try:
        async with upstream(silent) as (url, _):
            with pytest.raises(httpx.ReadTimeout):
                await quick.send("GET", f"{url}/v1/get_result", headers={})
    finally:
        await quick.aclose()


async def test_a_url_that_is_not_http_is_unsupported(client: UpstreamHTTP) -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        await client.send("GET", "ftp://127.0.0.1/sample.png", headers={})


async def test_the_environment_proxy_carries_plain_http_calls_unless_no_proxy_names_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with upstream(serving(lambda *_: answer("200 OK", b"via proxy"))) as (proxy, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.setenv("NO_PROXY", "direct.invalid")
        proxied = AiohttpUpstream(timeout=httpx.Timeout(5.0), max_connections=4)
        try:
            resp = await proxied.send("GET", "http://api.upstream.invalid/v1/get_result?id=1", headers={})
            with pytest.raises(httpx.ConnectError):  # not proxied: the name does not resolve
                await proxied.send("GET", "http://direct.invalid/v1/get_result", headers={})
        finally:
            await proxied.aclose()
    assert resp.content == b"via proxy"
    assert [line for line, _, _ in seen.requests] == ["GET http://api.upstream.invalid/v1/get_result?id=1 HTTP/1.1"]


async def test_each_hop_of_a_redirected_download_takes_its_own_urls_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A result URL reached through the proxy redirects to a host NO_PROXY names: that hop goes direct."""

    def respond(line: str, headers: dict[str, str], body: bytes) -> bytes:
        if line.startswith("GET http://results.upstream.invalid/"):  # the proxied hop (absolute form)
            return answer("302 Found", b"", f"location: http://{headers['x-direct']}/cdn/sample.png")
        return answer("200 OK", b"the image")

    async with upstream(serving(respond)) as (url, seen):
        direct = url.removeprefix("http://")
        monkeypatch.setenv("HTTP_PROXY", url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        client = AiohttpUpstream(timeout=httpx.Timeout(5.0), max_connections=4)
        try:
            async with client.stream(
                "http://results.upstream.invalid/a/sample.png", headers={"x-direct": direct}
            ) as resp:
                data = b"".join([chunk async for chunk in resp.aiter_bytes()])
        finally:
            await client.aclose()
    assert data == b"the image" and resp.url == f"{url}/cdn/sample.png"
    assert [line for line, _, _ in seen.requests] == [
        "GET http://results.upstream.invalid/a/sample.png HTTP/1.1",  # through the proxy
        "GET /cdn/sample.png HTTP/1.1",  # straight to the host NO_PROXY names
    ]


async def test_connections_are_capped_and_freed_for_the_next_caller() -> None:
    async def slow(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(seen, reader) is not None:
            await asyncio.sleep(0.05)
            writer.write(answer("200 OK", b"{}"))
            await writer.drain()

    capped = upstream_http(timeout=httpx.Timeout(10.0), max_connections=2)
    try:
        async with upstream(slow) as (url, seen):
            answers = await asyncio.gather(
                *(capped.send("GET", f"{url}/v1/get_result?id={i}", headers={}) for i in range(8))
            )
    finally:
        await capped.aclose()
    assert [r.status_code for r in answers] == [200] * 8
    assert seen.connections == 2


async def test_closing_the_client_closes_its_connections() -> None:
    closed = asyncio.Event()

    async def watch(seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(seen, reader) is not None:
            writer.write(answer("200 OK", b"{}"))
            await writer.drain()
        closed.set()

    c = upstream_http(timeout=httpx.Timeout(5.0))
    async with upstream(watch) as (url, _):
        await c.send("GET", f"{url}/v1/get_result", headers={})
        await c.aclose()
        await asyncio.wait_for(closed.wait(), 10)


async def test_cookies_are_neither_kept_nor_sent(client: UpstreamHTTP) -> None:
    """The providers authenticate by header: a cookie one answer sets is not sent with the next call
    (one connection pool serves every user's calls)."""
    async with upstream(serving(lambda *_: answer("200 OK", b"{}", "set-cookie: session=abc; Path=/"))) as (url, seen):
        first = await client.send("GET", f"{url}/v1/get_result?id=a", headers={})
        await client.send("GET", f"{url}/v1/get_result?id=b", headers={})
    assert first.headers["set-cookie"].startswith("session=abc")  # the answer itself is untouched
    assert [h.get("cookie") for _, h, _ in seen.requests] == [None, None]
