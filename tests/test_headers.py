"""Security headers as a browser receives them: the pages' Content-Security-Policy and framing
rules, the API's restrictive policy, nosniff and no referrer everywhere (error answers of the
middleware included), image links left embeddable, and /docs served whole by the gateway."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from conftest import running_server
from kontext_gateway.api.app import create_app
from kontext_gateway.api.headers import SecurityHeadersMiddleware
from kontext_gateway.config import Settings

PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
PAGE_ONLY = ("x-frame-options", "cross-origin-opener-policy")


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data = tmp_path_factory.mktemp("headers") / "data"
    with (
        running_server(Settings(data_dir=data, max_body_bytes=10_000)) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def assert_everywhere(r: httpx.Response) -> None:
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"  # image links carry their signature


def assert_api(r: httpx.Response) -> None:
    assert_everywhere(r)
    assert r.headers["content-security-policy"] == API_CSP
    for name in PAGE_ONLY:
        assert name not in r.headers


@pytest.mark.parametrize("path", ["/", "/playground", "/gallery", "/models/kontext-tiny", "/compare", "/docs"])
def test_pages_allow_this_origin_only_and_cannot_be_framed(http: httpx.Client, path: str) -> None:
    r = http.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert_everywhere(r)
    assert r.headers["content-security-policy"] == PAGE_CSP
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cross-origin-opener-policy"] == "same-origin"


def test_api_answers_get_a_restrictive_policy(http: httpx.Client) -> None:
    r = http.get("/v1/models")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert_api(r)
    assert_api(http.get("/openapi.json"))


def test_error_answers_get_the_headers_too(http: httpx.Client) -> None:
    r = http.get("/v1/no-such-route")  # the app's 404, in the OpenAI envelope
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert_api(r)
    # answered by the body-limit middleware itself, before any route
    r = http.post("/v1/images/generations", content=b"x" * 20_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert_api(r)


async def test_an_unexpected_error_gets_the_headers_too(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data"))

    async def broken() -> None:
        raise RuntimeError("a bug")  # answered by Starlette's outermost error handler

    app.add_api_route("/broken", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        r = await client.get("/broken")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert_api(r)


def test_image_links_stay_embeddable(http: httpx.Client) -> None:
    r = http.post(
        "/v1/images/generations",
        json={"model": "kontext-tiny", "prompt": "a red fox", "size": "32x32", "num_inference_steps": 1},
    )
    assert r.status_code == 200, r.text
    blob = http.get(r.json()["data"][0]["url"])
    assert blob.status_code == 200 and blob.headers["content-type"] == "image/png"
    assert_everywhere(blob)
    for name in ("content-security-policy", "cross-origin-resource-policy", *PAGE_ONLY):
        assert name not in blob.headers  # other sites show these links in their pages


def test_not_modified_answers_leave_the_cached_policy_alone(http: httpx.Client) -> None:
    first = http.get("/static/app.js")
    assert first.status_code == 200
    again = http.get("/static/app.js", headers={"if-none-match": first.headers["etag"]})
    assert again.status_code == 304
    assert_everywhere(again)
    assert "content-security-policy" not in again.headers  # a 304 updates what the browser cached


def test_docs_are_served_from_the_gateway(http: httpx.Client) -> None:
    page = http.get("/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in page and "/docs/assets/swagger-ui.css" in page
    assert "<script>" not in page  # no inline script: the page's policy refuses it
    assert all(link.startswith(("/", "data:")) for link in re.findall(r'(?:src|href)="([^"]*)"', page))
    for name, ctype in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
        r = http.get(f"/docs/assets/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype) and len(r.content) > 10_000
    assert http.get("/docs/assets/redoc.standalone.js").status_code == 404  # only what /docs loads
    assert http.get("/redoc").status_code == 404
    spec = http.get("/openapi.json")
    assert spec.status_code == 200 and "/v1/images/generations" in spec.json()["paths"]


def test_public_url_may_serve_the_pages_images(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", public_url="https://images.example.com:8443/gw/")
    with running_server(settings) as url:
        csp = httpx.get(f"{url}/gallery").headers["content-security-policy"]
    assert "img-src 'self' data: blob: https://images.example.com:8443;" in csp
    assert "connect-src 'self' https://images.example.com:8443;" in csp  # "edit this" fetches the image


async def test_headers_a_route_set_itself_are_kept() -> None:
    async def page(_request: object) -> HTMLResponse:
        return HTMLResponse(
            "<p>framed on purpose</p>",
            headers={"content-security-policy": "frame-ancestors https://example.com", "referrer-policy": "origin"},
        )

    app = SecurityHeadersMiddleware(Starlette(routes=[Route("/", page)]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.get("/")
    assert r.headers["content-security-policy"] == "frame-ancestors https://example.com"
    assert r.headers["referrer-policy"] == "origin"
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
