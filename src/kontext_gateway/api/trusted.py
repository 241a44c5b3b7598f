"""Which hosts and browser origins the gateway answers: no DNS rebinding, no cross-site requests.

The open loopback default runs next to a browser, so two attacks from any web page must fail:

- DNS rebinding: a page on `rebind.attacker.example` re-points its name at 127.0.0.1 and then reads
  the gateway as if it were its own origin. Its requests still say `Host: rebind.attacker.example`,
  so only allowed hosts are answered (as Django's ALLOWED_HOSTS and Starlette's
  TrustedHostMiddleware do): on a loopback bind `localhost`, `127.0.0.1` and `[::1]` (any port),
  plus `KONTEXT_ALLOWED_HOSTS` and the host of `KONTEXT_PUBLIC_URL`. Others get 400
  `invalid_host` (but for `/health`, which tells nothing and is probed by address). Links the
  gateway builds from the request's Host are therefore always to a trusted host. Bound beyond
  loopback with none of these set, any Host is answered (keys are required there anyway) and
  `kontext serve` says so at start.
- Cross-site requests: a page can POST text/plain, form or multipart bodies to any address without
  asking the browser's permission (no CORS preflight). A state-changing request (any method but
  GET, HEAD and OPTIONS) that a browser marks as coming from another origin (`Origin`, or
  `Sec-Fetch-Site: cross-site | same-site` when no Origin is sent) is refused with 403
  `cross_origin_request`, unless that origin is in `KONTEXT_CORS_ORIGINS`, for which CORS
  preflights are answered too (Starlette's CORSMiddleware). The gateway's own pages are same-origin;
  SDKs, curl and the replicate client send no Origin and are not affected.

It also refuses a URL holding a NUL character (400 `invalid_url`): it names nothing here, and
PostgreSQL cannot store or compare it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Settings
from ..errors import GatewayError
from .middleware import send_error

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
HEALTH = "/health"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# What a trusted origin's pages may send and read (the SDKs' headers, and this API's own).
CORS_METHODS = ["GET", "POST", "PATCH", "DELETE"]
CORS_HEADERS = [
    "authorization",
    "content-type",
    "idempotency-key",
    "prefer",
    "x-provider",
    "x-request-id",
    "openai-organization",
    "openai-project",
    "x-stainless-arch",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
]
CORS_EXPOSED = [
    "x-request-id",
    "x-kontext-provider",
    "x-kontext-model",
    "retry-after",
    "idempotent-replayed",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-images",
]


@dataclass(frozen=True)
class HostRule:
    """One allowed host: a name (lower case, IPv6 in brackets), optionally a port; "*.x" a suffix."""

    name: str
    port: int | None = None

    def matches(self, name: str, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.name == "*":
            return True
        if self.name.startswith("*."):
            return name.endswith(self.name[1:])
        return name == self.name

    @classmethod
    def parse(cls, text: str) -> HostRule:
        text = text.strip().lower()
        if text in ("*", "") or text.startswith("*."):
            return cls(text or "*")
        split = split_host(text)
        if split is None:
            raise ValueError(f"'{text}' is not a host name, an address or host:port")
        return cls(*split)


@dataclass(frozen=True)
class TrustPolicy:
    hosts: tuple[HostRule, ...]
    origins: frozenset[str]  # other sites' origins allowed to call (scheme://host[:port], normalised)

    @classmethod
    def from_settings(cls, settings: Settings) -> TrustPolicy:
        rules = [HostRule.parse(h) for h in settings.allowed_hosts]
        if settings.public_url:
            public = urlsplit(settings.public_url)
            if public.hostname:
                rules.append(HostRule(_bracketed(public.hostname)))
        if settings.binds_loopback():
            rules += [HostRule(name) for name in LOOPBACK_NAMES]
        elif not settings.allowed_hosts and not settings.public_url:
            rules.append(HostRule("*"))  # beyond loopback, unconfigured: any (and `kontext serve` warns)
        else:
            rules += [HostRule(name) for name in LOOPBACK_NAMES]  # health checks from the machine itself
        origins = frozenset(o for o in (normal_origin(text) for text in settings.cors_origins) if o)
        return cls(tuple(rules), origins)

    @property
    def any_host(self) -> bool:
        return any(rule.name == "*" and rule.port is None for rule in self.hosts)

    def host_allowed(self, host: str) -> bool:
        split = split_host(host.strip().lower())
        return split is not None and any(rule.matches(*split) for rule in self.hosts)

    def origin_allowed(self, origin: str, scheme: str, host: str) -> bool:
        """Whether a request sent by a page of `origin` may change something: the page is this
        gateway's own (same scheme-less host and port as the request), or its origin is trusted."""
        normal = normal_origin(origin)
        if normal is None:
            return False  # "null" (sandboxed frames, file: pages) or garbage
        if normal in self.origins:
            return True
        parts = urlsplit(normal)
        request_host = split_host(host.strip().lower())
        if request_host is None:
            return False
        name, port = request_host
        origin_port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        # Behind a TLS-terminating proxy the request arrives as http: compare host and port only,
        # the Host header's missing port being the origin scheme's default.
        return _bracketed(parts.hostname or "") == name and origin_port == (port or DEFAULT_PORTS.get(parts.scheme))


class TrustedRequestMiddleware:
    """Pure ASGI: refuses untrusted Host headers (every request) and cross-origin state changes."""

    def __init__(self, app: ASGIApp, policy: TrustPolicy) -> None:
        self.app = app
        self.policy = policy
        self._verdicts: dict[str, bool] = {}  # Host header -> allowed: a parse saved per request

    def _host_allowed(self, host: str) -> bool:
        verdict = self._verdicts.get(host)
        if verdict is None:
            if len(self._verdicts) >= 1024:  # bounded, however many names are tried
                self._verdicts.clear()
            verdict = self._verdicts[host] = self.policy.host_allowed(host)
        return verdict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = origin = fetch_site = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"sec-fetch-site":
                fetch_site = value.decode("latin-1").lower()
        # No Host at all: an HTTP/1.0 client, not a browser (browsers always send one). Health checks
        # tell nothing and come from load balancers and orchestrators by address: any Host.
        if (
            host is not None
            and not self.policy.any_host
            and not scope["path"].startswith(HEALTH)
            and not self._host_allowed(host)
        ):
            return await send_error(
                send,
                GatewayError(
                    f"This gateway does not answer to the host '{host[:100]}'. Allowed hosts are set with "
                    "KONTEXT_ALLOWED_HOSTS (and KONTEXT_PUBLIC_URL).",
                    status=400,
                    param="Host",
                    code="invalid_host",
                ),
            )
        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            # Not a name, an id or a filter of anything here, and PostgreSQL cannot even compare it.
            return await send_error(
                send,
                GatewayError(
                    "The URL holds a NUL character (%00), which is not accepted.", status=400, code="invalid_url"
                ),
            )
        if scope["method"] not in SAFE_METHODS:
            if origin is not None:
                refused = not self.policy.origin_allowed(origin, scope.get("scheme", "http"), host or "")
            else:
                refused = fetch_site in ("cross-site", "same-site")
            if refused:
                return await send_error(
                    send,
                    GatewayError(
                        f"Requests from the web page of another site ({(origin or 'unknown origin')[:100]}) may not "
                        "change anything here. To allow a site, add its origin to KONTEXT_CORS_ORIGINS.",
                        status=403,
                        type="permission_error",
                        param="Origin",
                        code="cross_origin_request",
                    ),
                )
        await self.app(scope, receive, send)


def split_host(text: str) -> tuple[str, int | None] | None:
    """'Example.com:8000' -> ('example.com', 8000); '[::1]' -> ('[::1]', None); None when malformed."""
    try:
        parts = urlsplit(f"//{text}")
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not name or parts.path or parts.query or parts.fragment or parts.username or parts.password is not None:
        return None
    return _bracketed(name), port


def normal_origin(text: str) -> str | None:
    """'HTTPS://App.Example.com:443/' -> 'https://app.example.com'; None unless an http(s) origin."""
    try:
        parts = urlsplit(text.strip())
        name, port = parts.hostname, parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not name:
        return None
    suffix = "" if port is None or port == DEFAULT_PORTS[parts.scheme] else f":{port}"
    return f"{parts.scheme}://{_bracketed(name)}{suffix}"


def _bracketed(name: str) -> str:
    """IPv6 addresses as a Host header writes them: in brackets."""
    return f"[{name}]" if ":" in name and not name.startswith("[") else name
