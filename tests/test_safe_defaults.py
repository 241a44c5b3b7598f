"""The open loopback default next to a browser, and a careless or hostile client: refused with a 4xx in
the OpenAI envelope, and nothing stored or changed by a refused request.

- another site's page cannot change anything (Origin / Sec-Fetch-Site), JSON routes take only JSON;
- a DNS-rebinding page cannot read anything (untrusted Host headers get 400), and links are built
  only from trusted hosts or KONTEXT_PUBLIC_URL;
- bodies that used to end in a 500 (lone surrogates, deep nesting, malformed IPv6 URLs, numbers out
  of range) are 400s; prompts, JSON bodies and n x area have limits.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import png_bytes, running_server
from kontext_gateway import safejson
from kontext_gateway.api.trusted import TrustPolicy
from kontext_gateway.config import Settings
from kontext_gateway.errors import GatewayError

EVIL = "http://evil.example"


def settings_for(tmp: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=tmp, database_url=f"sqlite:///{tmp / 'kontext.db'}", **overrides)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An open gateway on the embedded defaults (loopback, no keys), with its own database."""
    with running_server(settings_for(tmp_path_factory.mktemp("open"))) as url:
        yield url


@pytest.fixture(scope="module")
def http(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=120) as client:
        yield client


def error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"} and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def raw_json(http: httpx.Client, path: str, text: str, **headers: str) -> httpx.Response:
    """A body as an attacker writes it: bytes, not what json.dumps would make of a Python value."""
    return http.post(path, content=text.encode(), headers={"content-type": "application/json", **headers})


def stored(http: httpx.Client) -> tuple[int, int]:
    """(requests in the history, API keys): what a refused request must leave unchanged."""
    requests = http.get("/v1/requests", params={"limit": 100}).json()["data"]
    keys = http.get("/v1/admin/keys").json()["data"]
    return len(requests), len(keys)


def tiny_png_url() -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()


# -- cross-site requests ------------------------------------------------------------------------------

CROSS_SITE = [
    ("POST", "/v1/admin/keys", {"content": b'{"name":"x","admin":true}', "headers": {"content-type": "text/plain"}}),
    ("POST", "/v1/admin/keys", {"json": {"name": "x", "admin": True}}),
    (
        "POST",
        "/v1/images/generations",
        {"content": b'{"prompt":"a fox","size":"64x64"}', "headers": {"content-type": "text/plain"}},
    ),
    (
        "POST",
        "/v1/images/edits",
        {"data": {"prompt": "night", "size": "64x64"}, "files": [("image", ("a.png", png_bytes(32, 32), "image/png"))]},
    ),
    ("POST", "/v1/predictions", {"json": {"model": "kontext-tiny", "input": {"prompt": "a fox"}}}),
    ("POST", "/v1/files", {"files": [("content", ("a.png", png_bytes(32, 32), "image/png"))]}),
    ("POST", "/v1/predictions/req_123/cancel", {}),
    ("DELETE", "/v1/requests/req_123/payloads", {}),
    ("PATCH", "/v1/admin/keys/key_123", {"json": {"rpm": 1}}),
]


@pytest.mark.parametrize("method,path,kwargs", CROSS_SITE, ids=[f"{m} {p}" for m, p, _ in CROSS_SITE])
@pytest.mark.parametrize(
    "browser",
    [{"origin": EVIL}, {"origin": "null"}, {"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"}],
    ids=["origin", "null", "fetch-site", "same-site"],
)
def test_another_sites_page_cannot_change_anything(
    http: httpx.Client, method: str, path: str, kwargs: dict[str, Any], browser: dict[str, str]
) -> None:
    before = stored(http)
    kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), **browser}}
    err = error(http.request(method, path, **kwargs), 403, "cross_origin_request")
    assert "KONTEXT_CORS_ORIGINS" in err["message"]
    assert stored(http) == before
    # Still the open gateway: nobody was locked out by a key made behind the owner's back.
    assert http.get("/v1/models").status_code == 200


def test_the_gateways_own_pages_and_plain_clients_still_work(http: httpx.Client, gateway: str) -> None:
    body = {"model": "kontext-tiny", "prompt": "a fox", "size": "64x64", "num_inference_steps": 1}
    same_origin = {"origin": gateway, "sec-fetch-site": "same-origin"}  # what the playground sends
    resp = http.post("/v1/images/generations", json=body, headers=same_origin)
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"][0]["url"].startswith(gateway + "/v1/blobs/")
    port = gateway.rsplit(":", 1)[1]
    resp = http.post(
        "/v1/images/generations?dryRun=true",
        json=body,
        headers={"host": f"localhost:{port}", "origin": f"http://localhost:{port}"},
    )
    assert resp.status_code == 200, resp.text
    # A page on the same host but another port is another origin.
    error(
        http.post("/v1/images/generations", json=body, headers={"origin": "http://127.0.0.1:1"}),
        403,
        "cross_origin_request",
    )
    # curl and the SDKs send no Origin: unaffected (a GET from anywhere changes nothing).
    assert http.post("/v1/images/generations?dryRun=true", json=body).status_code == 200
    assert http.get("/v1/models", headers={"origin": EVIL}).status_code == 200


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/images/generations", {"prompt": "a fox"}),
        ("/v1/images/edits", {"prompt": "night", "images": [{"image_url": "data:,"}]}),
        ("/v1/predictions", {"model": "kontext-tiny", "input": {"prompt": "a fox"}}),
        ("/v1/admin/keys", {"name": "x", "admin": True}),
    ],
)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_routes_take_only_json(
    http: httpx.Client, path: str, body: dict[str, Any], content_type: str | None
) -> None:
    before = stored(http)
    headers = {"content-type": content_type} if content_type else {}
    resp = http.post(path, content=json.dumps(body).encode(), headers=headers)
    error(resp, 415, "unsupported_media_type")
    assert stored(http) == before


def test_files_take_only_multipart(http: httpx.Client) -> None:
    error(
        http.post("/v1/files", content=b"content=x", headers={"content-type": "application/x-www-form-urlencoded"}),
        415,
        "unsupported_media_type",
    )


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway told which other hosts and origins to trust."""
    settings = settings_for(
        tmp_path_factory.mktemp("configured"),
        allowed_hosts=["images.example.com", "*.example.org"],
        cors_origins=["https://app.example"],
    )
    with running_server(settings) as url:
        yield url


def test_trusted_origins_get_cors_and_others_do_not(configured: str, gateway: str) -> None:
    preflight = {
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, idempotency-key",
    }
    with httpx.Client(base_url=configured) as http:
        resp = http.options("/v1/images/generations", headers=preflight)
        assert resp.status_code == 200, resp.text
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
        allowed = resp.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "idempotency-key"} <= {h.strip() for h in allowed.split(",")}
        resp = http.post(
            "/v1/images/generations?dryRun=true",
            json={"model": "kontext-tiny", "prompt": "a fox"},
            headers={"origin": "https://app.example"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in resp.headers["access-control-expose-headers"].lower()
        # Any other origin: no CORS grant, and its state changes are refused.
        resp = http.options("/v1/images/generations", headers={**preflight, "origin": EVIL})
        assert "access-control-allow-origin" not in resp.headers
        error(
            http.post("/v1/images/generations", json={"prompt": "a fox"}, headers={"origin": EVIL}),
            403,
            "cross_origin_request",
        )
    # Unconfigured (the default), no origin gets a grant.
    resp = httpx.options(f"{gateway}/v1/images/generations", headers=preflight)
    assert "access-control-allow-origin" not in resp.headers


# -- DNS rebinding and links ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/webhooks/default/secret",
        "/v1/requests",
        "/v1/models",
        "/",
        "/gallery",
        "/static/app.js",
        "/v1/blobs/x.png?exp=1&sig=x",
        "/openapi.json",
        "/metrics",
    ],
)
def test_a_rebinding_page_reads_nothing(http: httpx.Client, path: str) -> None:
    resp = http.get(path, headers={"host": "rebind.evil.example:8000"})
    err = error(resp, 400, "invalid_host")
    assert "KONTEXT_ALLOWED_HOSTS" in err["message"]
    assert "whsec_" not in resp.text


def test_health_answers_any_host(http: httpx.Client) -> None:
    # Probed by address (a pod's IP) and telling nothing.
    assert http.get("/health", headers={"host": "10.1.2.3:8000"}).json() == {"status": "ok"}


@pytest.mark.parametrize("host", ["localhost", "localhost:1234", "127.0.0.1:9", "[::1]:8000", "[::1]", "LOCALHOST:80"])
def test_loopback_names_are_answered_on_any_port(http: httpx.Client, host: str) -> None:
    assert http.get("/v1/models", headers={"host": host}).status_code == 200


@pytest.mark.parametrize(
    "host,ok",
    [
        ("images.example.com", True),
        ("images.example.com:8443", True),
        ("a.example.org", True),
        ("example.org", False),
        ("evil.example.com", False),
        ("localhost:8000", True),
        ("images.example.com.evil.example", False),
        ("images.example.com@evil.example", False),
        ("[::1", False),
    ],
)
def test_allowed_hosts_are_the_configured_ones(configured: str, host: str, ok: bool) -> None:
    resp = httpx.get(f"{configured}/v1/models", headers={"host": host})
    assert resp.status_code == (200 if ok else 400), resp.text


def test_links_are_built_only_from_trusted_hosts(configured: str, tmp_path: Path) -> None:
    body = {"model": "kontext-tiny", "prompt": "a fox", "size": "64x64", "num_inference_steps": 1}
    resp = httpx.post(
        f"{configured}/v1/images/generations", json=body, headers={"host": "images.example.com"}, timeout=120
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"][0]["url"].startswith("http://images.example.com/v1/blobs/")
    error(
        httpx.post(f"{configured}/v1/images/generations", json=body, headers={"host": "attacker.example"}),
        400,
        "invalid_host",
    )
    # With a public URL, links use it whatever the Host, and its host is trusted.
    with running_server(settings_for(tmp_path, public_url="https://img.example.net/base")) as url:
        for host in (None, "img.example.net"):
            resp = httpx.post(
                f"{url}/v1/images/generations", json=body, timeout=120, headers={"host": host} if host else {}
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["data"][0]["url"].startswith("https://img.example.net/base/v1/blobs/")


def test_trust_policy_beyond_loopback() -> None:
    # Bound beyond loopback with nothing configured: any Host (keys are required there), and a warning.
    assert TrustPolicy.from_settings(Settings(host="0.0.0.0")).any_host
    policy = TrustPolicy.from_settings(Settings(host="0.0.0.0", allowed_hosts=["gw.internal"]))
    assert not policy.any_host
    assert policy.host_allowed("gw.internal:8000") and policy.host_allowed("localhost")
    assert not policy.host_allowed("rebind.evil.example")
    policy = TrustPolicy.from_settings(Settings(host="0.0.0.0", public_url="https://images.example.com"))
    assert policy.host_allowed("images.example.com") and not policy.host_allowed("other.example.com")
    # The origin behind a TLS-terminating proxy is https, the request to the gateway plain http.
    assert policy.origin_allowed("https://images.example.com", "http", "images.example.com")
    assert not policy.origin_allowed("https://images.example.com", "http", "images.example.com:8443")


# -- bodies that used to be 500s -------------------------------------------------------------------------

SURROGATE = '"\\ud800"'
SURROGATE_BODIES = [
    ("/v1/images/generations", f'{{"model": {SURROGATE}, "prompt": "a fox"}}', "model"),
    ("/v1/images/generations", f'{{"size": {SURROGATE}, "prompt": "a fox"}}', "size"),
    ("/v1/images/generations", f'{{"prompt": {SURROGATE}}}', "prompt"),
    ("/v1/images/generations", '{"prompt": "a \\udfff fox"}', "prompt"),
    ("/v1/predictions", f'{{"model": "kontext-tiny", "input": {{"prompt": {SURROGATE}}}}}', "input.prompt"),
    ("/v1/predictions", f'{{"model": {SURROGATE}, "input": {{"prompt": "a fox"}}}}', "model"),
    (
        "/v1/predictions",
        '{{"model": "kontext-tiny", "input": {{"prompt": "a"}}, "webhook": "https://x.example/{}"}}'.format("\\ud800"),
        "webhook",
    ),
    ("/v1/admin/keys", f'{{"name": {SURROGATE}}}', "name"),
]


@pytest.mark.parametrize("path,text,param", SURROGATE_BODIES, ids=[f"{p} {q}" for p, _, q in SURROGATE_BODIES])
def test_lone_surrogates_are_a_400_naming_the_field(http: httpx.Client, path: str, text: str, param: str) -> None:
    before = stored(http)
    err = error(raw_json(http, path, text), 400, "invalid_json")
    assert err["param"] == param and "surrogate" in err["message"]
    assert stored(http) == before
    # Encoded as UTF-8 bytes rather than escaped (json.loads would let them through): refused too.
    err = error(raw_json_bytes(http, path, text.replace("\\ud800", "\ud800")), 400, "invalid_json")


def raw_json_bytes(http: httpx.Client, path: str, text: str) -> httpx.Response:
    return http.post(path, content=text.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits", "/v1/predictions", "/v1/admin/keys"])
def test_deep_nesting_is_a_400(http: httpx.Client, path: str) -> None:
    for depth in (1000, 30_000):  # 30,000 levels fit even the admin routes' 64 KiB
        error(raw_json(http, path, '{"prompt": "a", "x": ' + "[" * depth + "]" * depth + "}"), 400, "invalid_json")


@pytest.mark.parametrize("route", ["/v1/predictions", "/v1/requests"])
@pytest.mark.parametrize(
    "inner",
    [b"[" * 300 + b"]" * 300, b"[" * 5000, b'{"a": 1}', b'["\\ud800", "x"]', b"[1, 2]", b"not json", b"\xff\xfe"],
)
def test_hostile_cursors_are_a_400(http: httpx.Client, route: str, inner: bytes) -> None:
    cursor = base64.urlsafe_b64encode(inner).decode().rstrip("=")
    error(http.get(route, params={"cursor": cursor}), 400, "invalid_cursor")


@pytest.mark.parametrize("url", ["http://[::1/", "http://[fe80::1%eth0/x.png", "https://[", "http://[::1]:99999/"])
def test_malformed_urls_are_a_400(http: httpx.Client, url: str) -> None:
    before = stored(http)
    resp = http.post("/v1/predictions", json={"model": "kontext-tiny", "input": {"prompt": "a", "input_image": url}})
    assert error(resp, 400)["param"] == "input.input_image"
    resp = http.post("/v1/images/edits", json={"model": "kontext-tiny", "prompt": "a", "images": [{"image_url": url}]})
    assert error(resp, 400)["param"] == "images[0].image_url"
    resp = http.post(
        "/v1/images/edits",
        json={
            "model": "kontext-tiny",
            "prompt": "a",
            "mask": {"image_url": url},
            "images": [{"image_url": tiny_png_url()}],
        },
    )
    assert error(resp, 400)["param"] == "mask.image_url"
    assert stored(http)[1] == before[1]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "k", "budget_usd": 1e308}',
        '{"name": "k", "budget_usd": 1e400}',
        '{"name": "k", "budget_usd": NaN}',
        '{"name": "k", "budget_usd": Infinity}',
        '{"name": "k", "budget_usd": -Infinity}',
        '{"name": "k", "rpm": 9223372036854775808}',
        '{"name": "k", "max_concurrent": 9223372036854775807}',
        '{"name": "k", "ipm": 2147483648}',
        '{"name": "k", "rpm": %s}' % ("9" * 5000),
        '{"name": "line\\nbreak"}',
        '{"name": "%s"}' % ("k" * 129),
    ],
)
def test_admin_numbers_out_of_range_are_a_400(http: httpx.Client, text: str) -> None:
    before = stored(http)
    error(raw_json(http, "/v1/admin/keys", text), 400)
    assert stored(http) == before


def test_the_largest_allowed_admin_numbers_are_stored(tmp_path: Path) -> None:
    with running_server(settings_for(tmp_path)) as url:
        resp = httpx.post(
            f"{url}/v1/admin/keys",
            json={"name": "big", "budget_usd": 1e9, "rpm": 2**31 - 1, "ipm": 2**31 - 1, "max_concurrent": 2**31 - 1},
        )
        assert resp.status_code == 201, resp.text
        key = resp.json()
        assert (key["budget_usd"], key["rpm"], key["max_concurrent"]) == (1e9, 2**31 - 1, 2**31 - 1)


# -- bounded work per request ----------------------------------------------------------------------------


def test_prompt_is_limited_to_32000_characters(http: httpx.Client) -> None:
    body = {"model": "kontext-tiny", "size": "64x64"}
    assert http.post("/v1/images/generations?dryRun=true", json={**body, "prompt": "a" * 32_000}).status_code == 200
    err = error(
        http.post("/v1/images/generations", json={**body, "prompt": "a" * 32_001}), 400, "string_above_max_length"
    )
    assert err["param"] == "prompt" and "32000" in err["message"]
    err = error(
        http.post("/v1/predictions", json={"model": "kontext-tiny", "input": {"prompt": "é" * 40_000}}),
        400,
        "string_above_max_length",
    )
    assert "32000" in err["message"]


def test_a_huge_prompt_is_refused_early_and_not_stored_whole(http: httpx.Client) -> None:
    prompt = "a fox " * 1_750_000  # 10.5 MB
    # Text-to-image carries no images: its bodies are small, and a big one is refused unread.
    error(
        http.post("/v1/images/generations", json={"model": "kontext-tiny", "prompt": prompt}), 413, "request_too_large"
    )
    resp = http.post("/v1/predictions", json={"model": "kontext-tiny", "input": {"prompt": prompt}})
    error(resp, 400, "string_above_max_length")
    record = http.get(f"/v1/requests/{resp.headers['x-request-id']}").json()
    assert record["status"] == "failed"
    assert len(json.dumps(record)) < 20_000  # what was asked is kept, cut short
    assert len(resp.content) < 2_000  # and not echoed


def test_many_tiny_json_values_are_refused_before_parsing(http: httpx.Client) -> None:
    items = b"[" + b",".join([b"{}"] * 3_000_000) + b"]"  # 9 MB that json.loads would make 250 MB of
    resp = http.post(
        "/v1/predictions",
        content=b'{"model":"kontext-tiny","input":{"prompt":"a","x":' + items + b"}}",
        headers={"content-type": "application/json"},
    )
    assert "too many JSON values" in error(resp, 400, "invalid_json")["message"]


def test_unknown_parameters_are_bounded(http: httpx.Client) -> None:
    body = {"model": "kontext-tiny", "prompt": "a", "size": "64x64", "style_hint": "x" * 70_000}
    err = error(http.post("/v1/images/generations?dryRun=true", json=body), 400, "parameter_too_large")
    assert err["param"] == "style_hint"


def test_n_times_area_has_a_budget_per_provider(http: httpx.Client, tmp_path: Path) -> None:
    body = {"model": "kontext-tiny", "prompt": "a fox"}
    before = stored(http)
    err = error(http.post("/v1/images/generations", json={**body, "n": 10, "size": "2048x2048"}), 400)
    assert "budget of 4194304 pixels" in err["message"] and "KONTEXT_LOCAL_MAX_REQUEST_PIXELS" in err["message"]
    resp = http.post(
        "/v1/predictions", json={"model": "kontext-tiny", "input": {**body, "num_outputs": 2, "size": "2048x2048"}}
    )
    assert "budget" in error(resp, 400)["message"]
    assert stored(http)[1] == before[1]
    # Within the budget: accepted.
    assert (
        http.post("/v1/images/generations?dryRun=true", json={**body, "n": 4, "size": "1024x1024"}).status_code == 200
    )
    schema = http.get("/v1/models/kontext-tiny", params={"schema": "true"}).json()["schema"]
    assert schema["limits"]["max_request_pixels"] == {"local/kontext-tiny": 4 * 1024 * 1024}
    assert schema["modes"]["text-to-image"]["properties"]["n"]["x-max-request-pixels"] == {
        "local/kontext-tiny": 4194304
    }
    # The operator sets it.
    with running_server(settings_for(tmp_path, local_max_request_pixels=64 * 64)) as url:
        resp = httpx.post(f"{url}/v1/images/generations?dryRun=true", json={**body, "n": 2, "size": "64x64"})
        assert "budget of 4096 pixels" in error(resp, 400)["message"]


# -- the JSON parser itself -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,words",
    [
        ("[" * 33 + "]" * 33, "nested too deeply"),
        ('{"a": NaN}', "not finite"),
        ("[1e999]", "not finite"),
        ("[-Infinity]", "not finite"),
        ('["\\udc80"]', "surrogate"),
        ("[" + "1," * 100_000 + "1]", "too many"),
        ("{", "not valid JSON"),
        ("1" * 5000, "not valid JSON"),
    ],
)
def test_safejson_refuses(text: str, words: str) -> None:
    with pytest.raises(GatewayError) as caught:
        safejson.loads(text.encode())
    assert caught.value.status == 400 and words in caught.value.message


def test_safejson_takes_documented_payloads() -> None:
    big = "data:image/png;base64," + "A" * 5_000_000
    body = {"model": "m", "input": {"input_images": [{"image_url": big}], "prompt": "ünïcödé 🦊, " * 100}}
    assert safejson.loads(json.dumps(body).encode()) == body
    assert safejson.loads("[" * 32 + "]" * 32) is not None
    with pytest.raises(GatewayError, match="not valid UTF-8"):
        safejson.loads(b'{"a": "\xff"}')


@pytest.mark.parametrize(
    "method,path,kwargs",
    [
        ("POST", "/v1/images/generations", {"json": {"prompt": "a\u0000b", "size": "64x64"}}),
        (
            "POST",
            "/v1/images/edits",
            {"data": {"prompt": "a\u0000b"}, "files": [("image", ("a.png", png_bytes(32, 32), "image/png"))]},
        ),
        ("POST", "/v1/predictions", {"json": {"model": "kontext-tiny", "input": {"prompt": "a\u0000"}}}),
        (
            "POST",
            "/v1/files",
            {
                "content": b'--b\r\nContent-Disposition: form-data; name="content"; filename="a\x00.png"'
                b"\r\nContent-Type: image/png\r\n\r\n" + png_bytes(32, 32) + b"\r\n--b--\r\n",
                "headers": {"content-type": "multipart/form-data; boundary=b"},
            },
        ),  # a raw NUL: httpx escapes it
        ("POST", "/v1/admin/keys", {"json": {"name": "k", "self": 1}}),
        ("PATCH", "/v1/admin/keys/key_1", {"json": {"key_id": "x"}}),
        ("GET", "/v1/requests?model=%00", {}),
        ("GET", "/v1/predictions/%00", {}),
        ("GET", "/v1/usage?model=a%00", {}),
        ("GET", "/v1/models/", {}),
    ],
)
def test_nul_characters_and_odd_fields_are_a_400_on_every_database(
    database_url: str, tmp_path: Path, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    """NUL cannot be stored (or even compared) by PostgreSQL; unknown admin fields named like the
    store's own arguments once reached it as keyword arguments; a trailing slash was an empty 307."""
    with running_server(Settings(data_dir=tmp_path, database_url=database_url)) as url:
        resp = httpx.request(method, url + path, timeout=60, **kwargs)
        assert 400 <= resp.status_code < 500, resp.text
        assert resp.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/admin/keys").json()["data"] == []
