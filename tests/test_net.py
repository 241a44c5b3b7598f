"""Outbound URL checks (SSRF): every class of address that must not be reached, by literal IP and name."""

from __future__ import annotations

import socket

import pytest

from kontext_gateway.errors import GatewayError
from kontext_gateway.net import check_public_url, ensure_public_url

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("[::1]", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("[fd12:3456::1]", "private"),
    ("[fc00::1]", "private"),
    ("169.254.1.1", "link-local"),
    ("[fe80::1]", "link-local"),
    ("169.254.169.254", "metadata"),
    ("[fd00:ec2::254]", "metadata"),
    ("0.0.0.0", "unspecified"),
    ("[::]", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.1.2.3", "multicast"),
    ("[ff02::1]", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("100.64.0.1", "non-public"),  # carrier-grade NAT
    # IPv4 wrapped in IPv6: judged by the IPv4 address inside.
    ("[::ffff:127.0.0.1]", "loopback"),
    ("[::ffff:10.0.0.1]", "private"),
    ("[::ffff:169.254.169.254]", "metadata"),
    ("[2002:7f00:1::]", "loopback"),  # 6to4 of 127.0.0.1
    ("[64:ff9b::a00:1]", "private"),  # NAT64 of 10.0.0.1
    ("[::127.0.0.1]", "reserved"),  # IPv4-compatible (deprecated)
    ("[::8.8.8.8]", "IPv4-compatible"),  # deprecated whatever it wraps
    ("[::ffff:0:7f00:1]", "IPv4-translated"),
    ("[::ffff:0.0.0.0]", "unspecified"),
    ("0.1.2.3", "this network"),
    ("192.0.0.1", "IETF protocol"),
    ("192.0.0.9", "IETF protocol"),
    ("[fec0::1]", "site-local"),
    ("[fefe:1::1]", "site-local"),  # fec0::/10, deprecated
    ("[2001:0:4136:e378:8000:63bf:3fff:fdd2]", "Teredo"),
    ("[2001::8.8.8.8]", "Teredo"),
    ("[64:ff9b:1::a00:1]", "local-use NAT64"),
    ("[100::1]", "discard-only"),
    ("[2001:db8::1]", "documentation"),
    ("[3fff::1]", "documentation"),
    ("[5f00::1]", "SRv6"),
]


@pytest.mark.parametrize("host,reason", REFUSED)
def test_private_addresses_are_refused(host: str, reason: str) -> None:
    with pytest.raises(GatewayError) as info:
        check_public_url(f"http://{host}:8080/hook", allow_private=False, param="webhook", status=422)
    err = info.value
    assert (err.status, err.code, err.param) == (422, "url_not_allowed", "webhook")
    assert reason in err.message and "KONTEXT_ALLOW_PRIVATE_URLS" in err.message
    # The operator's switch lets them all through.
    check_public_url(f"http://{host}:8080/hook", allow_private=True, param="webhook", status=422)


@pytest.mark.parametrize(
    "host",
    ["8.8.8.8", "1.1.1.1", "[2606:4700:4700::1111]", "[::ffff:8.8.8.8]", "[2002:808:808::1]", "[64:ff9b::808:808]"],
)
def test_public_addresses_pass(host: str) -> None:
    check_public_url(f"https://{host}/hook", allow_private=False, param="webhook", status=422)


def test_localhost_by_name_is_loopback() -> None:
    with pytest.raises(GatewayError) as info:
        check_public_url("http://localhost:9/x", allow_private=False, param="input.image", status=400)
    assert info.value.status == 400 and info.value.code == "url_not_allowed" and info.value.param == "input.image"
    assert "'localhost' resolves to" in info.value.message and "loopback" in info.value.message


def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_getaddrinfo(host: str, port: object, *args: object, **kw: object) -> list:
        answers = {
            "public.example": ["93.184.215.14"],
            "mixed.example": ["93.184.215.14", "10.0.0.5"],
            "scoped.example": ["fe80::1%eth0"],
        }
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 443)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    check_public_url("https://public.example/x", allow_private=False, param="webhook", status=422)
    with pytest.raises(GatewayError, match=r"resolves to 10\.0\.0\.5, a private address"):
        check_public_url("https://mixed.example/x", allow_private=False, param="webhook", status=422)
    with pytest.raises(GatewayError, match="link-local"):
        check_public_url("https://scoped.example/x", allow_private=False, param="webhook", status=422)
    with pytest.raises(GatewayError) as info:
        check_public_url("https://nowhere.example/x", allow_private=False, param="webhook", status=422)
    assert info.value.code == "invalid_url" and "could not be resolved" in info.value.message


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "gopher://1.2.3.4/",
        "not a url",
        "http://",
        "http://[::1/x",
        "http://example.com:99999/x",
        "//example.com/x",
    ],
)
def test_malformed_or_non_http_urls(url: str) -> None:
    for allow in (False, True):  # malformed is malformed, whatever the operator allows
        with pytest.raises(GatewayError) as info:
            check_public_url(url, allow_private=allow, param="webhook", status=422)
        assert info.value.code == "invalid_url" and info.value.status == 422


async def test_async_wrapper() -> None:
    with pytest.raises(GatewayError) as info:
        await ensure_public_url("http://127.0.0.1/x", allow_private=False, param="image", status=400)
    assert info.value.status == 400 and info.value.code == "url_not_allowed"
    await ensure_public_url("http://127.0.0.1/x", allow_private=True, param="image", status=400)
    await ensure_public_url("http://8.8.8.8/x", allow_private=False, param="image", status=400)
