"""Security headers on every response, chosen by what the response is (pure ASGI, bytes built once).

Rules:
- Every response: `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer` (image links
  carry their signature in the query: a page must not hand them to another site).
- HTML (the web pages, /docs): a CSP that allows this origin only (`page_csp`; plus `data:` and
  `blob:` images, for the icon and the previews of chosen files, and the origin of `public_url`,
  where image links point), `X-Frame-Options: DENY` for browsers older than `frame-ancestors`, and
  `Cross-Origin-Opener-Policy: same-origin`.
- Any other response with a body type (JSON, event streams, metrics, scripts, styles): `API_CSP`:
  opened as a document, nothing in it runs and no site can frame it.
- Images (the /v1/blobs/ links): the two headers every response gets and nothing more: other apps
  embed them, and a browser's own image viewer styles itself inline.
- No content type (a 304, a 204): the two headers only. A 304 updates the headers a browser cached
  for the page, so a CSP chosen without knowing the body must not land on it.
- A header the route set itself is kept.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HeaderList = tuple[tuple[bytes, bytes], ...]

API_CSP = "default-src 'none'; frame-ancestors 'none'"
BASE: HeaderList = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))
API: HeaderList = (*BASE, (b"content-security-policy", API_CSP.encode()))


def page_csp(public_url: str | None = None) -> str:
    """The pages' CSP; with `public_url` (where image links point) its origin may serve images and fetches."""
    other = ""
    if public_url:
        parts = urlsplit(public_url)
        other = f" {parts.scheme}://{parts.netloc}"
    return (
        f"default-src 'self'; img-src 'self' data: blob:{other}; style-src 'self'; script-src 'self'; "
        f"connect-src 'self'{other}; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


class SecurityHeadersMiddleware:
    """Adds the headers of the module's rules to each response's start message."""

    def __init__(self, app: ASGIApp, public_url: str | None = None) -> None:
        self.app = app
        self.page: HeaderList = (
            *BASE,
            (b"content-security-policy", page_csp(public_url).encode()),
            (b"x-frame-options", b"DENY"),
            (b"cross-origin-opener-policy", b"same-origin"),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def decorated_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                ctype = next((value for name, value in headers if name.lower() == b"content-type"), b"")
                headers += [header for header in self._chosen(ctype) if header[0] not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, decorated_send)

    def _chosen(self, content_type: bytes) -> HeaderList:
        ctype = content_type.lower()
        if ctype.startswith(b"text/html"):
            return self.page
        if not ctype or ctype.startswith(b"image/"):
            return BASE
        return API
