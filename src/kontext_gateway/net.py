"""Outbound URLs a client hands us (webhooks, input images): refuse those that reach inside.

A gateway that fetches or posts to any URL a client names is an SSRF proxy into its own network:
loopback admin ports, the cloud metadata service (credentials), private services. The rules:

- Every address the host resolves to is checked, so a public name that also points at 10.0.0.5 is
  refused (`forbidden_reason` says which addresses are not public).
- The connection goes to an address that was checked: `PinnedTransport` resolves the name once when
  it connects, checks every answer and connects to those addresses only. Checking first and letting
  the HTTP client resolve again would let a short-TTL name answer public to the check and 127.0.0.1
  to the connect (DNS rebinding). The Host header and TLS (SNI, certificate verification) still use
  the name.
- No redirects: a 3xx is an answer, never a hop to an address nobody checked. No proxies either: a
  proxy would resolve the name itself.
- `check_public_url` / `ensure_public_url` only check (to refuse a URL early, with a clear message);
  the connection itself goes through `PinnedTransport`, or `fetch_image` for input images.

`allow_private` (the operator's KONTEXT_ALLOW_PRIVATE_URLS) lets every address through; connections
are pinned all the same.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import typing
from urllib.parse import urlsplit

import httpcore
import httpx

from .errors import GatewayError, invalid, too_large

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance metadata (AWS/GCP/Azure/OpenStack use 169.254.169.254; AWS's IPv6 endpoint; Alibaba).
METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")}
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: the last 32 bits are an IPv4 address
# Refused by name, whatever the running Python's ipaddress tables say: those tables differ between
# releases, and some releases call these ranges global.
NOT_PUBLIC: list[tuple[IPNetwork, str]] = [
    (ipaddress.ip_network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", 'a "this network" address'),  # 0.0.0.0 itself connects to this host on Linux
        ("192.0.0.0/24", "an IETF protocol assignment address"),
        ("::/96", "a reserved address (IPv4-compatible, deprecated)"),
        ("::ffff:0:0:0/96", "a reserved address (IPv4-translated)"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),  # translated by the local network: to anything
        ("100::/64", "a discard-only address"),
        ("2001::/32", "a Teredo tunnel address"),  # reaches an IPv4 host through a relay
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("5f00::/16", "an SRv6 segment identifier"),
        ("fec0::/10", "a site-local address (deprecated)"),
    )
]
HINT = "set KONTEXT_ALLOW_PRIVATE_URLS=1 (or allow_private_urls = true in the config file) to allow it"
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's own defaults


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why the gateway must not connect to this address, or None when it is a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address wrapped in IPv6 reaches that IPv4 address: judge the inner one.
        inner = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if inner is not None:
            return forbidden_reason(inner)
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    if ip in METADATA:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    for network, reason in NOT_PUBLIC:
        if ip in network:
            return reason
    if ip.is_reserved:  # 240.0.0.0/4 and broadcast; unassigned IPv6 blocks
        return "a reserved address"
    if ip.is_private:  # RFC 1918, unique-local fc00::/7, documentation and benchmark ranges
        return "a private address"
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "a non-public address"
    return None


def split_url(url: str, *, param: str, status: int) -> tuple[str, int]:
    """(host, port) of an http(s) URL; GatewayError(status, `invalid_url`) for anything else."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:  # a bad port or a malformed IPv6 literal
        raise _bad(f"'{param}' is not a valid URL.", param, status) from None
    if parts.scheme not in ("http", "https") or not host:
        raise _bad(f"'{param}' must be an http or https URL.", param, status)
    return host, port or (443 if parts.scheme == "https" else 80)


def resolve_checked(host: str, port: int, *, allow_private: bool, param: str, status: int) -> list[IPAddress]:
    """Every address `host` resolves to, resolved once (blocking), in the resolver's order of
    preference. GatewayError(status) when it does not resolve, or when one of them is not public and
    the operator does not allow those."""
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]  # a literal (an IPv6 one may carry %scope)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _bad(f"'{param}': the host '{host}' could not be resolved ({exc}).", param, status) from None
        # The scope (fe80::1%eth0) stays: it is part of where a link-local connection goes.
        addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0])) for info in infos))
    if allow_private:
        return addresses
    for ip in addresses:
        reason = forbidden_reason(ip)
        if reason is not None:
            where = f"'{host}' resolves to {ip}, " if str(ip) != host else f"{ip} is "
            raise GatewayError(
                f"'{param}' is not allowed: {where}{reason}. Only public addresses are "
                f"reached unless the operator allows others: {HINT}.",
                status=status,
                param=param,
                code="url_not_allowed",
            )
    return addresses


def check_public_url(url: str, *, allow_private: bool, param: str, status: int) -> None:
    """Raise GatewayError(status) unless `url` is http(s) and every address its host resolves to is
    public. Blocking (DNS): call `ensure_public_url` from async code. A check, not a pin: connect
    through `PinnedTransport`."""
    host, port = split_url(url, param=param, status=status)
    if not allow_private:
        resolve_checked(host, port, allow_private=False, param=param, status=status)


async def ensure_public_url(url: str, *, allow_private: bool, param: str, status: int) -> None:
    """`check_public_url` with the DNS lookup off the event loop."""
    if allow_private:
        check_public_url(url, allow_private=True, param=param, status=status)
    else:
        await asyncio.to_thread(check_public_url, url, allow_private=False, param=param, status=status)


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the check at connect time: the host is resolved once, every
    address checked (`resolve_checked`), and the socket connects to one of those addresses, in order,
    never to the name (which the socket layer would resolve again). TLS is started by httpcore on the
    returned stream with the name as server_hostname, so SNI and certificate checks use the name.

    A refused or unresolvable host raises GatewayError(status, param) out of the request."""

    def __init__(self, *, allow_private: bool, param: str, status: int) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private, self._param, self._status = allow_private, param, status

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await asyncio.to_thread(
            resolve_checked, host, port, allow_private=self._allow_private, param=self._param, status=self._status
        )
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for ip in addresses:  # the next checked address when one does not answer
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # getaddrinfo answers at least one address or raises
        raise failure

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport whose connections go through `PinnedBackend`: hand it to an
    httpx.AsyncClient (with follow_redirects=False) and use the client as usual. No proxy from the
    environment applies to a client given a transport."""

    def __init__(
        self,
        *,
        allow_private: bool,
        param: str,
        status: int,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        ssl_context = httpx.create_ssl_context(verify=verify)  # built once (the CA bundle), used by our pool
        super().__init__(verify=ssl_context, limits=limits)
        # httpx takes no network backend: the pool it builds, with ours as its backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PinnedBackend(allow_private=allow_private, param=param, status=status),
        )


async def fetch_image(url: str, *, param: str, allow_private: bool, max_bytes: int, deadline_s: float) -> bytes:
    """GET an input image a client named by URL: the body's bytes. Through `PinnedTransport`, no
    redirects, at most `max_bytes`, and everything from the lookup to the last byte within
    `deadline_s` (httpx's own timeouts apply to each connect or read, so a server trickling a byte
    at a time would never trip them).

    Errors (GatewayError, param `param`): 400 `invalid_url` / `url_not_allowed` (see
    `resolve_checked`), 400 `image_url_unreachable` (not 200, network error, the deadline),
    413 `file_too_large`."""
    split_url(url, param=param, status=400)
    transport = PinnedTransport(allow_private=allow_private, param=param, status=400)
    try:
        async with (
            asyncio.timeout(deadline_s),
            httpx.AsyncClient(transport=transport, timeout=deadline_s, follow_redirects=False) as client,
            client.stream("GET", url) as resp,
        ):
            if resp.status_code != 200:
                raise _unreachable(f"'{param}' could not be fetched: HTTP {resp.status_code}.", param)
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(f"'{param}' is over {max_bytes} bytes.", param=param, code="file_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except (TimeoutError, httpx.TimeoutException):
        raise _unreachable(
            f"'{param}' could not be fetched within the {deadline_s:g} s deadline for an "
            "image URL (KONTEXT_FETCH_TIMEOUT_S).",
            param,
        ) from None
    except httpx.HTTPError as exc:
        raise _unreachable(f"'{param}' could not be fetched ({type(exc).__name__}).", param) from None


def _unreachable(message: str, param: str) -> GatewayError:
    return invalid(message, param=param, code="image_url_unreachable")


def _bad(message: str, param: str, status: int) -> GatewayError:
    return GatewayError(message, status=status, param=param, code="invalid_url")
