"""The HTTP calls to the hosted providers: httpx requests and responses, aiohttp's connections.

The provider code speaks httpx (requests, responses, multipart, its exception tree) and tests inject
httpx transports. Two layers of httpx are left out, each for the CPU it costs per call:

- its transport (httpcore on anyio) costs several times the CPU of aiohttp's for the same calls: a
  cancel scope per socket read, pool bookkeeping per request that grows with the number of
  connections. `AiohttpTransport` hands the wire to an aiohttp session and translates its errors into
  httpx's, so callers classify failures exactly as before;
- its client (`httpx.AsyncClient`) wraps every call in machinery these calls never use: an auth flow,
  a redirect loop (a call that carries a key follows no redirect), a cookie jar (the providers
  authenticate by header, and one jar shared by every user's calls is state nobody wants), a base URL
  and default headers merged per call, event hooks. `UpstreamHTTP` builds one `httpx.Request` per
  call and hands it to the transport; a result download follows redirects itself.

`benchmarks/upstream_client.py` measures one job's submit, poll and 1.7 MB download each way.

Only what upstream calls need: HTTP/1.1, the CA bundle httpx would trust (certifi's, or
`SSL_CERT_FILE` / `SSL_CERT_DIR`), and the environment's proxies (`HTTPS_PROXY`, `HTTP_PROXY`,
`NO_PROXY`), read when the transport is made.
"""

from __future__ import annotations

import contextlib
import ssl
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx

from .. import __version__

# Longest status line and header field accepted from an upstream (aiohttp's default is 8 KiB; httpx
# took up to 100 KiB, and signed result URLs can make long Location headers).
MAX_HEADER_BYTES = 64 * 1024


@contextlib.contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    """aiohttp's exceptions raised as the httpx exceptions httpcore would have raised for the same failure."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except (aiohttp.SocketTimeoutError, TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:  # refused, unreachable, DNS, TLS handshake and certificate
        raise httpx.ConnectError(str(exc), request=request) from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request) from exc
    except aiohttp.ClientPayloadError as exc:  # the body ended early or its framing was broken
        raise httpx.ReadError(str(exc), request=request) from exc
    except aiohttp.ClientResponseError as exc:  # a malformed status line or header
        raise httpx.RemoteProtocolError(exc.message or str(exc), request=request) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:  # not http(s), or no host
        raise httpx.UnsupportedProtocol(f"{type(exc).__name__}: {exc}", request=request) from exc
    except aiohttp.ClientError as exc:  # the connection failed some other way (reset, closed)
        raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc


class _Body(httpx.AsyncByteStream):
    """An aiohttp response's body, as httpx reads it; closing it frees the connection."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(self._request):
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        # Back to the pool when the body was read to its end; closed otherwise.
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose connections are an aiohttp session's (made on first use, inside the loop)."""

    def __init__(self, *, max_connections: int, keepalive_s: float = 5.0, ssl_context: ssl.SSLContext | None = None):
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._ssl = ssl_context if ssl_context is not None else httpx.create_ssl_context(trust_env=True)
        self._proxies = urllib.request.getproxies_environment()  # read once, not per request
        self._session: aiohttp.ClientSession | None = None

    def _proxy_for(self, url: httpx.URL) -> str | None:
        proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
        if proxy is None or urllib.request.proxy_bypass(url.host):
            return None
        return proxy

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=self._keepalive_s, ssl=self._ssl
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # no cookies at all: see the module
                auto_decompress=False,  # httpx decodes the content-encoding
                max_line_size=MAX_HEADER_BYTES,
                max_field_size=MAX_HEADER_BYTES,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        body = await request.aread()  # upstream request bodies are bounded (inputs are capped before)
        headers = request.headers.multi_items()
        if "transfer-encoding" in request.headers:  # the body is sent whole, with its length
            headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        with _as_httpx_errors(request):
            response = await self._session_now().request(
                request.method,
                str(request.url),
                headers=headers,
                data=body or None,
                allow_redirects=False,  # httpx follows them, where the caller asked
                proxy=self._proxy_for(request.url),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),  # waiting for a free connection, and making it
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()}
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


# Sent with every call unless the call sets its own: who calls, and only the content encodings httpx
# decodes (aiohttp's defaults could name one it does not).
DEFAULT_HEADERS = {"accept": "*/*", "accept-encoding": "gzip, deflate", "user-agent": f"kontext-gateway/{__version__}"}


class UpstreamHTTP:
    """Calls to a hosted provider: each one `httpx.Request` handed to `transport` (see the module).

    `send` reads the answer whole and never follows a redirect (a 3xx comes back as it is); `stream`
    is a GET whose body is read as it arrives, following up to `max_redirects` redirects. No cookies
    are kept or sent. Failures are httpx's exceptions, as from `httpx.AsyncClient`."""

    def __init__(self, transport: httpx.AsyncBaseTransport, *, timeout: httpx.Timeout, max_redirects: int = 10) -> None:
        self._transport = transport
        self._timeout = timeout.as_dict()
        self.max_redirects = max_redirects

    def _request(self, method: str, url: str | httpx.URL, headers: dict[str, str], **body: Any) -> httpx.Request:
        return httpx.Request(
            method, url, headers={**DEFAULT_HEADERS, **headers}, extensions={"timeout": self._timeout}, **body
        )

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response

    async def send(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        headers: dict[str, str],
        json: Any = None,
        content: bytes | None = None,
        files: Any = None,
        data: Any = None,
    ) -> httpx.Response:
        """One call, its answer read whole (content-encoding decoded)."""
        request = self._request(method, url, headers, json=json, content=content, files=files, data=data)
        response = await self._handle(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    @contextlib.asynccontextmanager
    async def stream(self, url: str, *, headers: dict[str, str]) -> AsyncIterator[httpx.Response]:
        """A GET of `url`, redirects followed; the answer's body is read from it (`aiter_bytes`)."""
        target: str | httpx.URL = url
        for _ in range(self.max_redirects + 1):
            request = self._request("GET", target, headers)
            response = await self._handle(request)
            if not response.has_redirect_location:  # a 301, 302, 303, 307 or 308 with a Location
                break
            await response.aclose()
            try:
                target = request.url.join(response.headers["location"])
            except httpx.InvalidURL as exc:  # as httpx's client says it
                raise httpx.RemoteProtocolError(f"Invalid URL in location header: {exc}.", request=request) from None
        else:
            raise httpx.TooManyRedirects(f"more than {self.max_redirects} redirects", request=request)
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()


def upstream_http(*, timeout: httpx.Timeout, max_connections: int = 256) -> UpstreamHTTP:
    """What a hosted provider calls its upstream with: aiohttp's connections, up to `max_connections`."""
    return UpstreamHTTP(AiohttpTransport(max_connections=max_connections), timeout=timeout)
