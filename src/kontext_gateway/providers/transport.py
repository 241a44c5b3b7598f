"""The HTTP calls to the hosted providers: one small interface, on aiohttp's connections or any httpx transport.

A hosted provider needs two kinds of call (`UpstreamHTTP`): `send`, whose answer is read whole and
never follows a redirect (a call that carries a key sends it nowhere else), and `stream`, a GET of a
result whose body is read as it arrives, following redirects. Answers are plain data
(`UpstreamAnswer`, `UpstreamStream`); failures are httpx's exceptions (`httpx.TimeoutException`,
`httpx.TransportError`, ...), whichever client made the call, so a provider classifies them once, and
`AnswerTooLarge`: an answer read whole holds at most `max_answer_bytes` (a result download is capped
by its reader as it streams).

- `AiohttpUpstream` is what the gateway runs: straight onto an aiohttp session. httpx's own stack
  costs several times the CPU per call: its transport (httpcore on anyio) a cancel scope per socket
  read and pool bookkeeping that grows with the connections, its request and response models a URL
  parse, header lists and a chain of body wrappers per call (`benchmarks/upstream_client.py`).
- `HttpxUpstream` makes the same calls through any httpx transport: tests pass httpx's
  `MockTransport`, and its real one shows both behave alike.

Either way: HTTP/1.1, no cookies kept or sent (the providers authenticate by header, and one jar for
every user's calls is state nobody wants), the CA bundle httpx would trust (certifi's, or
`SSL_CERT_FILE` / `SSL_CERT_DIR`), the environment's proxies (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`,
read when the client is made), and the content-encodings of `DEFAULT_HEADERS` decoded.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import ssl
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx
from multidict import CIMultiDict
from yarl import URL

from .. import __version__

# Longest status line and header field accepted from an upstream (aiohttp's default is 8 KiB; httpx
# took up to 100 KiB, and signed result URLs can make long Location headers).
MAX_HEADER_BYTES = 64 * 1024

# The most an answer read whole may hold, content-encoding decoded. The providers' answers are JSON
# documents of a few KiB (an echoed input at most a few MiB); a larger one is refused, not held.
MAX_ANSWER_BYTES = 16 * 1024 * 1024

# Sent with every call unless the call sets its own: who calls, and only the content-encodings both
# clients decode.
DEFAULT_HEADERS = {"accept": "*/*", "accept-encoding": "gzip, deflate", "user-agent": f"kontext-gateway/{__version__}"}


class AnswerTooLarge(Exception):
    """An answer to `send` longer than the client's `max_answer_bytes` (declared, or as it arrived)."""

    def __init__(self, limit: int) -> None:
        size = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit:,} bytes"
        super().__init__(f"the answer is over {size}")
        self.limit = limit


async def joined_up_to(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The chunks joined, unless together they are over `limit` (AnswerTooLarge as soon as they are):
    an answer read whole here, a result download by its provider."""
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise AnswerTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """An answer read whole: its status, headers (case-insensitive), body (content-encoding decoded)
    and the URL it came from."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes
    url: str

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return jsonlib.loads(self.content)


@dataclass(frozen=True, slots=True)
class UpstreamStream:
    """An answer whose body is read as it arrives (`aiter_bytes`, once); `url` is where the last
    redirect led."""

    status_code: int
    headers: Mapping[str, str]
    url: str
    chunks: AsyncIterator[bytes]

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self.chunks


class UpstreamHTTP(Protocol):
    max_redirects: int
    max_answer_bytes: int

    async def send(
        self,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str],
        json: Any = None,
        content: bytes | None = None,
        files: Any = None,
        data: Any = None,
    ) -> UpstreamAnswer:
        """One call, its answer read whole (AnswerTooLarge past `max_answer_bytes`); a redirect comes
        back as it is."""
        ...

    def stream(self, url: str, *, headers: Mapping[str, str]) -> contextlib.AbstractAsyncContextManager[UpstreamStream]:
        """A GET of `url`, up to `max_redirects` redirects followed; the body read from the answer."""
        ...

    async def aclose(self) -> None: ...


def upstream_http(*, timeout: httpx.Timeout, max_connections: int = 256) -> AiohttpUpstream:
    """What a hosted provider calls its upstream with: aiohttp's connections, up to `max_connections`."""
    return AiohttpUpstream(timeout=timeout, max_connections=max_connections)


# -- on aiohttp's connections ---------------------------------------------------------------------------

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})  # followed by a download when they name a Location


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    """aiohttp's exceptions raised as the httpx exceptions httpx's own transport raises for the same failure."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
    except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
    except aiohttp.ClientConnectorError as exc:  # refused, unreachable, DNS, TLS handshake and certificate
        raise httpx.ConnectError(str(exc)) from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from exc
    except aiohttp.ClientPayloadError as exc:  # the body ended early, its framing or its encoding was broken
        raise httpx.RemoteProtocolError(str(exc)) from exc
    except aiohttp.ClientResponseError as exc:  # a malformed status line or header
        raise httpx.RemoteProtocolError(exc.message or str(exc)) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:  # not http(s), or no host
        raise httpx.UnsupportedProtocol(f"{type(exc).__name__}: {exc}") from exc
    except aiohttp.ClientError as exc:  # the connection failed some other way (reset, closed)
        raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, unless its declared length (before any byte is read) or what arrived is over `limit`."""
    if response.content_length is not None:
        if response.content_length > limit:
            raise AnswerTooLarge(limit)
        if "content-encoding" not in response.headers:
            return await response.read()  # framed by its declared length, read as it is: no more
    return await joined_up_to(response.content.iter_any(), limit)


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    # Each piece as it arrived, not joined with those buffered beside it (as iter_any would): whoever
    # reads the body whole joins it once.
    with _as_httpx_errors():
        async for chunk, _ in response.content.iter_chunks():
            if chunk:
                yield chunk


class AiohttpUpstream:
    """`UpstreamHTTP` on an aiohttp session (made on first use, inside the running loop)."""

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        max_connections: int,
        max_redirects: int = 10,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        keepalive_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_redirects = max_redirects
        self.max_answer_bytes = max_answer_bytes
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._ssl = ssl_context if ssl_context is not None else httpx.create_ssl_context(trust_env=True)
        self._proxies = urllib.request.getproxies_environment()  # read once, not per call
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeout.pool,  # waiting for a free connection, and making it
            sock_connect=timeout.connect,
            sock_read=timeout.read,
        )
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=self._keepalive_s, ssl=self._ssl
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # no cookies at all: see the module
                max_line_size=MAX_HEADER_BYTES,
                max_field_size=MAX_HEADER_BYTES,
                timeout=self._timeout,
            )
        return self._session

    def _proxy_for(self, url: URL) -> str | None:
        if not self._proxies:
            return None
        proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
        if proxy is None or urllib.request.proxy_bypass(url.host or ""):
            return None
        return proxy

    async def send(
        self,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str],
        json: Any = None,
        content: bytes | None = None,
        files: Any = None,
        data: Any = None,
    ) -> UpstreamAnswer:
        target = _url(url)
        body, content_type = _body(json=json, content=content, files=files, data=data)
        sent = _headers(headers)
        if content_type is not None:
            sent.setdefault("content-type", content_type)
        with _as_httpx_errors():
            async with self._session_now().request(
                method,
                target,
                headers=sent,
                data=body,
                allow_redirects=False,
                proxy=self._proxy_for(target),
            ) as response:
                content = await _read_capped(response, self.max_answer_bytes)
                return UpstreamAnswer(response.status, response.headers, content, str(response.url))

    @contextlib.asynccontextmanager
    async def stream(self, url: str, *, headers: Mapping[str, str]) -> AsyncIterator[UpstreamStream]:
        # Redirects followed here, not by aiohttp: each hop's proxy is its own URL's (NO_PROXY).
        target, sent = _url(url), _headers(headers)
        for _ in range(self.max_redirects + 1):
            with _as_httpx_errors():
                response = await self._session_now().request(
                    "GET", target, headers=sent, allow_redirects=False, proxy=self._proxy_for(target)
                )
            location = response.headers.get("location")
            if response.status not in _REDIRECT_STATUSES or location is None:
                break
            response.release()
            try:
                target = response.url.join(URL(location))
            except ValueError as exc:  # as httpx's client says it
                raise httpx.RemoteProtocolError(f"Invalid URL in location header: {exc}.") from None
        else:
            raise httpx.TooManyRedirects(f"more than {self.max_redirects} redirects")
        try:
            yield UpstreamStream(response.status, response.headers, str(response.url), _chunks(response))
        finally:
            response.release()  # back to the pool when the body was read to its end; closed otherwise

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _url(url: str | URL) -> URL:
    if isinstance(url, URL):
        return url
    try:
        return URL(url)
    except (ValueError, TypeError) as exc:
        raise httpx.UnsupportedProtocol(f"not a URL: {exc}") from None


def _headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    merged = CIMultiDict(DEFAULT_HEADERS)
    merged.update(headers)  # case-insensitively: a call's own value replaces the default
    return merged


def _body(*, json: Any, content: bytes | None, files: Any, data: Any) -> tuple[bytes | None, str | None]:
    """A call's body as sent, and its content type: JSON as httpx writes it (compact, UTF-8, no NaN),
    a multipart form by httpx's own encoder (its boundary in the type), or `content` as it is."""
    if files is not None or data is not None:
        form = httpx.Request("POST", "http://form.invalid/", files=files, data=data)
        return form.read(), form.headers["content-type"]
    if json is not None:
        text = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode(), "application/json"
    return content, None


# -- through an httpx transport -------------------------------------------------------------------------


class HttpxUpstream:
    """`UpstreamHTTP` through `transport`: one `httpx.Request` per call, handed to it as it is (no
    client: its auth flow, cookie jar, base URL and event hooks are machinery these calls never use)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        timeout: httpx.Timeout,
        max_redirects: int = 10,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._transport = transport
        self._timeout = timeout.as_dict()
        self.max_redirects = max_redirects
        self.max_answer_bytes = max_answer_bytes

    def _request(
        self, method: str, url: str | URL | httpx.URL, headers: Mapping[str, str], **body: Any
    ) -> httpx.Request:
        return httpx.Request(
            method,
            url if isinstance(url, httpx.URL) else str(url),
            headers={**DEFAULT_HEADERS, **headers},
            extensions={"timeout": self._timeout},
            **body,
        )

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response

    async def send(
        self,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str],
        json: Any = None,
        content: bytes | None = None,
        files: Any = None,
        data: Any = None,
    ) -> UpstreamAnswer:
        request = self._request(method, url, headers, json=json, content=content, files=files, data=data)
        response = await self._handle(request)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_answer_bytes:
                raise AnswerTooLarge(self.max_answer_bytes)
            content = await joined_up_to(response.aiter_bytes(), self.max_answer_bytes)
        finally:
            await response.aclose()
        return UpstreamAnswer(response.status_code, response.headers, content, str(request.url))

    @contextlib.asynccontextmanager
    async def stream(self, url: str, *, headers: Mapping[str, str]) -> AsyncIterator[UpstreamStream]:
        target: str | httpx.URL = url
        for _ in range(self.max_redirects + 1):
            request = self._request("GET", target, headers)
            response = await self._handle(request)
            if not response.has_redirect_location:  # a 301, 302, 303, 307 or 308 with a Location
                break
            try:
                await response.aread()  # as httpx's client does: the connection then serves the next one
            finally:
                await response.aclose()
            try:
                target = request.url.join(response.headers["location"])
            except httpx.InvalidURL as exc:  # as httpx's client says it
                raise httpx.RemoteProtocolError(f"Invalid URL in location header: {exc}.", request=request) from None
        else:
            raise httpx.TooManyRedirects(f"more than {self.max_redirects} redirects", request=request)
        try:
            yield UpstreamStream(response.status_code, response.headers, str(response.url), response.aiter_bytes())
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()
