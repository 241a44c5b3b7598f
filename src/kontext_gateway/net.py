"""Outbound URLs a client hands us (webhooks, input images): refuse those that reach inside.

A gateway that fetches or posts to any URL a client names is an SSRF proxy into its own network:
loopback admin ports, the cloud metadata service (credentials), private services. Every address the
host resolves to is checked, so a public name pointing at 10.0.0.5 is refused too. The check runs
again right before each use (see jobs/webhooks.py), as DNS answers can change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from .errors import GatewayError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance metadata (AWS/GCP/Azure/OpenStack use 169.254.169.254; AWS's IPv6 endpoint; Alibaba).
METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")}
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: the last 32 bits are an IPv4 address
HINT = "set KONTEXT_ALLOW_PRIVATE_URLS=1 (or allow_private_urls = true in the config file) to allow it"


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
    if ip.is_reserved:  # 240.0.0.0/4 and broadcast; unassigned IPv6 blocks
        return "a reserved address"
    if ip.is_private:  # RFC 1918, unique-local fc00::/7, documentation and benchmark ranges
        return "a private address"
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "a non-public address"
    return None


def check_public_url(url: str, *, allow_private: bool, param: str, status: int) -> None:
    """Raise GatewayError(status) unless `url` is http(s) and every address its host resolves to is
    public. Blocking (DNS): call `ensure_public_url` from async code."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:  # a bad port or a malformed IPv6 literal
        raise _bad(f"'{param}' is not a valid URL.", param, status) from None
    if parts.scheme not in ("http", "https") or not host:
        raise _bad(f"'{param}' must be an http or https URL.", param, status)
    if allow_private:
        return
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80),
                                       type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise _bad(f"'{param}': the host '{host}' could not be resolved ({exc}).", param, status) from None
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    for ip in sorted(addresses, key=str):
        reason = forbidden_reason(ip)
        if reason is not None:
            where = f"'{host}' resolves to {ip}, " if str(ip) != host else f"{ip} is "
            raise GatewayError(f"'{param}' is not allowed: {where}{reason}. Only public addresses are "
                               f"reached unless the operator allows others: {HINT}.",
                               status=status, param=param, code="url_not_allowed")


async def ensure_public_url(url: str, *, allow_private: bool, param: str, status: int) -> None:
    """`check_public_url` with the DNS lookup off the event loop."""
    if allow_private:
        check_public_url(url, allow_private=True, param=param, status=status)
    else:
        await asyncio.to_thread(check_public_url, url, allow_private=False, param=param, status=status)


def _bad(message: str, param: str, status: int) -> GatewayError:
    return GatewayError(message, status=status, param=param, code="invalid_url")
