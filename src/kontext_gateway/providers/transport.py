"""The HTTP client for calls to the hosted providers: httpx's interface over aiohttp's connections.

The provider code speaks httpx (requests, responses, multipart, its exception tree) and tests inject
httpx transports. Underneath, httpx's own transport (httpcore on anyio) costs several times the CPU
of aiohttp's for the same calls: a cancel scope per socket read, pool bookkeeping per request that
grows with the number of connections. `benchmarks/upstream_client.py` measures one job's submit,
poll and 1.7 MB download both ways. `AiohttpTransport` keeps httpx on top (redirects, content
decoding, timeouts per request) and hands the wire to an aiohttp session, translating its errors into
httpx's so callers classify failures exactly as before.

No cookies (`UpstreamClient`): the providers authenticate by header, and one jar shared by every
user's calls is state nobody wants; httpx would parse each answer for cookies (about a sixth of the
client's CPU per call, beside aiohttp's own work).

Only what upstream calls need: HTTP/1.1, the CA bundle httpx would trust (certifi's, or
`SSL_CERT_FILE` / `SSL_CERT_DIR`), and the environment's proxies (`HTTPS_PROXY`, `HTTP_PROXY`,
`NO_PROXY`), read when the client is made.
"""

from __future__ import annotations

import contextlib
import ssl
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx

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


class _NoCookies(httpx.Cookies):
    """A jar that stays empty: answers' cookies are not read, requests get none."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass


class UpstreamClient(httpx.AsyncClient):
    """httpx's client without cookies (see the module)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise AttributeError("the upstream client keeps no cookies")


def upstream_client(*, timeout: httpx.Timeout, max_connections: int = 256) -> httpx.AsyncClient:
    """The client a hosted provider calls its upstream with: redirects never followed unless a call
    asks, no cookies kept or sent."""
    return UpstreamClient(
        transport=AiohttpTransport(max_connections=max_connections),
        timeout=timeout,
        follow_redirects=False,
    )
