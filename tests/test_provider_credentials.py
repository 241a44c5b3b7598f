"""Provider keys go to the provider's own hosts only, and never follow a redirect.

The gateway runs against the four fakes plus `Elsewhere`, a server on another loopback port that
records everything reaching it. A provider response naming that host (BFL's polling_url, fal's
status_url, Replicate's urls.get) or a redirect to it must never bring it the key: the attempt fails
with a clear, classified error, and the request fails over. Result downloads (no key) still follow
redirects, e.g. to a CDN. The host rule itself (documented hosts, https only, look-alikes) is checked
against a recording transport with the providers' real base URLs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from conftest import open_image, running_server, sdk_for
from fakes.common import Elsewhere, serve
from fakes.upstreams import Upstreams
from kontext_gateway.catalog import Catalog
from kontext_gateway.config import Settings
from kontext_gateway.providers import hosted
from kontext_gateway.providers.bfl import BFL
from kontext_gateway.providers.calls import Pending, Task
from kontext_gateway.providers.errors import BadResult, UntrustedURL
from kontext_gateway.providers.fal import Fal
from kontext_gateway.providers.fireworks import Fireworks
from kontext_gateway.providers.hosted import HostedProvider
from kontext_gateway.providers.replicate import Replicate

PRIORITY = {"bfl": 0, "fal": 1, "replicate": 2, "fireworks": 3}  # bfl first, then fal
# What each fake checks as its credential (header, value).
KEYS = {
    "bfl": ("x-key", "bfl_test"),
    "fal": ("authorization", "Key fal_test"),
    "replicate": ("authorization", "Bearer r8_test"),
    "fireworks": ("authorization", "Bearer fw_test"),
}


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[tuple[Elsewhere, str]]:
    other = Elsewhere()
    with serve(other.app) as url:
        yield other, url


@pytest.fixture(scope="module")
def cdn(upstreams: Upstreams) -> Iterator[tuple[Elsewhere, str]]:
    """Another host serving BFL's result files, as the CDN a result URL redirects to."""
    other = Elsewhere(results=upstreams.bfl.results)
    with serve(other.app) as url:
        yield other, url


@pytest.fixture(scope="module")
def gateway(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = upstreams.settings(
        tmp_path_factory.mktemp("credentials"), provider_priority=PRIORITY, breaker_failures=1000
    )
    with running_server(settings) as url:
        yield url


@pytest.fixture(autouse=True)
def _reset(upstreams: Upstreams, elsewhere: tuple[Elsewhere, str], cdn: tuple[Elsewhere, str]) -> None:
    upstreams.reset()
    elsewhere[0].requests.clear()
    cdn[0].requests.clear()


@pytest.fixture
def sdk(gateway: str) -> Iterator[OpenAI]:
    with sdk_for(gateway) as client:
        yield client


def meta(resp: Any) -> dict[str, Any]:
    return resp.model_extra["metadata"]


def generate_with(gateway: str, provider: str) -> httpx.Response:
    """One image from this provider alone (no failover), as raw HTTP: any status comes back."""
    return httpx.post(
        f"{gateway}/v1/images/generations",
        timeout=60,
        json={"model": f"{provider}/flux.1-kontext-pro", "prompt": "a lighthouse"},
    )


def assert_key_never_sent(other: Elsewhere) -> None:
    for headers in other.headers_seen():
        assert not {"x-key", "authorization"} & set(headers), headers


# -- URLs a provider returns ----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["bfl", "fal", "replicate"])
def test_a_returned_url_on_another_host_never_gets_the_key(
    gateway: str, upstreams: Upstreams, elsewhere: tuple[Elsewhere, str], provider: str
) -> None:
    other, other_url = elsewhere
    upstreams.all[provider].faults.add("foreign_url", at="submit", location=other_url)
    resp = generate_with(gateway, provider)
    assert_key_never_sent(other)
    assert other.requests == []  # nothing at all went there
    assert resp.status_code == 502, resp.text  # a clear upstream failure, not a crash
    error = resp.json()["error"]
    assert error["code"] == "all_providers_exhausted"
    host = other_url.removeprefix("http://")
    assert "malformed_response" in error["message"] and f"{host}: refused" in error["message"]
    assert upstreams.submits(provider) == 1  # the provider would answer alike: not retried
    assert KEYS[provider][1] not in resp.text


def test_a_refused_url_fails_over_to_the_next_provider(
    sdk: OpenAI, upstreams: Upstreams, elsewhere: tuple[Elsewhere, str]
) -> None:
    other, other_url = elsewhere
    upstreams.bfl.faults.add("foreign_url", at="submit", location=other_url)
    resp = sdk.images.generate(model="flux.1-kontext-pro", prompt="a lighthouse", response_format="b64_json")
    assert_key_never_sent(other)
    m = meta(resp)
    assert m["provider"] == "fal"
    first, second = m["attempts"]
    assert (first["config_key"], first["error_class"]) == ("bfl/flux.1-kontext-pro", "malformed_response")
    assert "BFL_API_KEY was not sent" in first["message"] and second["outcome"] == "succeeded"
    assert other.requests == []


# -- redirects ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "at"),
    [
        ("bfl", "submit"),
        ("bfl", "poll"),
        ("fal", "poll"),
        ("fal", "result"),
        ("replicate", "poll"),
        ("fireworks", "poll"),
    ],
)
def test_a_redirect_is_never_followed_with_the_key(
    gateway: str, upstreams: Upstreams, elsewhere: tuple[Elsewhere, str], provider: str, at: str
) -> None:
    other, other_url = elsewhere
    upstreams.all[provider].faults.add("redirect", at=at, location=other_url)
    resp = generate_with(gateway, provider)
    assert_key_never_sent(other)
    assert other.requests == []
    assert resp.status_code == 502, resp.text
    message = resp.json()["error"]["message"]
    assert f"-> 302: a redirect to {other_url}, not followed" in message
    assert (("redirect", at)) in upstreams.all[provider].faults.fired


def test_result_downloads_follow_redirects_without_any_key(
    gateway: str, upstreams: Upstreams, cdn: tuple[Elsewhere, str]
) -> None:
    other, cdn_url = cdn
    upstreams.bfl.faults.add("redirect", at="download", location=cdn_url)
    resp = generate_with(gateway, "bfl")
    assert resp.status_code == 200, resp.text
    assert open_image(httpx.get(resp.json()["data"][0]["url"]).content).format == "PNG"
    [(method, path, _headers, _)] = other.requests  # the image came from the CDN...
    assert method == "GET" and path.startswith("/results/")
    assert_key_never_sent(other)
    hops = [(p, h) for _, p, h, _ in upstreams.bfl.requests]
    assert any(p.startswith("/results/") for p, _ in hops)  # ...after the provider's redirect
    for p, h in hops:  # the key on every API call, polling included, and on no download hop
        assert h.get("x-key") == (None if p.startswith("/results/") else "bfl_test")


def test_a_result_that_redirects_forever_is_a_bad_result(sdk: OpenAI, upstreams: Upstreams) -> None:
    upstreams.bfl.faults.always("redirect", at="download", location=upstreams.urls["bfl"])  # to itself
    m = meta(sdk.images.generate(model="flux.1-kontext-pro", prompt="a lighthouse", response_format="b64_json"))
    assert m["provider"] == "fal"
    failed = [a for a in m["attempts"] if a["outcome"] == "failed"]
    assert failed and {a["error_class"] for a in failed} == {"bad_result"}
    assert all("too many redirects" in a["message"] for a in failed)


# -- the host rule, with the providers' real base URLs ------------------------------------------------------

REAL = {"bfl": BFL, "fal": Fal, "replicate": Replicate, "fireworks": Fireworks}
PENDING = {
    "bfl": {"id": "1", "status": "Pending"},
    "fal": {"status": "IN_QUEUE", "request_id": "1"},
    "replicate": {"id": "1", "status": "processing"},
    "fireworks": {"id": "1", "status": "Pending"},
}
FIREWORKS_POLL = "https://api.fireworks.ai/inference/v1/workflows/accounts/fireworks/models/flux-kontext-pro/get_result"
ALLOWED = [
    ("bfl", "https://api.bfl.ai/v1/get_result?id=1"),
    ("bfl", "https://api.us1.bfl.ai/v1/get_result?id=1"),  # the cluster a polling_url names
    ("bfl", "https://api.eu.bfl.ai/v1/get_result?id=1"),
    ("bfl", "https://API.EU1.BFL.AI:443/v1/get_result?id=1"),
    ("fal", "https://queue.fal.run/fal-ai/flux-pro/requests/1/status"),
    ("replicate", "https://api.replicate.com/v1/predictions/1"),
    ("fireworks", FIREWORKS_POLL),  # built from the base URL: Fireworks returns no URL
]
REFUSED = [
    ("bfl", "http://api.us1.bfl.ai/v1/get_result?id=1", "not over https"),  # the key in clear text
    ("bfl", "https://api.bfl.ai:8443/v1/get_result?id=1", "not on the https port"),  # another service
    ("bfl", "https://api.bfl.ai.evil.example/v1/get_result?id=1", "not one of bfl's hosts"),
    ("bfl", "https://api.bfl.ai@evil.example/v1/get_result?id=1", "not one of bfl's hosts"),
    ("bfl", "https://api.bfl.ai\\@evil.example/v1/get_result?id=1", "not an absolute URL"),  # read two ways
    ("bfl", "https://api.x.us1.bfl.ai/v1/get_result?id=1", "not one of bfl's hosts"),
    ("bfl", "https://delivery.eu.bfl.ai/v1/get_result?id=1", "not one of bfl's hosts"),  # downloads need no key
    ("bfl", "https://evil.example/v1/get_result?id=1", "not one of bfl's hosts"),
    ("bfl", "/v1/get_result?id=1", "not an absolute URL"),
    ("fal", "https://queue.fal.run.evil.example/fal-ai/flux-pro/requests/1/status", "not one of fal's hosts"),
    ("fal", "http://queue.fal.run/fal-ai/flux-pro/requests/1/status", "not over https"),
    ("fal", "https://v3.fal.media/fal-ai/flux-pro/requests/1/status", "not one of fal's hosts"),
    ("replicate", "https://replicate.delivery/v1/predictions/1", "not one of replicate's hosts"),
    ("replicate", "https://api.replicate.com.evil.example/v1/predictions/1", "not one of replicate's hosts"),
]


def real_provider(name: str, tmp_path: Path) -> tuple[HostedProvider, list[httpx.Request]]:
    """The adapter with its default (real) base URL, over a transport that records each request and
    answers that the task is still pending."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=PENDING[name])

    settings = Settings(
        data_dir=tmp_path,
        bfl_api_key="bfl_test",
        fal_key="fal_test",
        replicate_api_token="r8_test",
        fireworks_api_key="fw_test",
    )
    return HostedProvider(REAL[name], settings, transport=httpx.MockTransport(answer)), seen


async def poll_at(provider: HostedProvider, name: str, url: str) -> None:
    """The adapter polls a task whose provider response named `url` (Fireworks: its own poll URL)."""
    data = {
        "bfl": {"polling_url": url},
        "fal": {"status_url": url, "response_url": url, "cancel_url": url, "count": 1},
        "replicate": {"get": url, "cancel": url},
        "fireworks": {},
    }[name]
    entry = Catalog.load().resolve(f"{name}/flux.1-kontext-pro")[1]
    task = Task(id="1", data=data)
    answer = await provider.send(provider.dialect.poll(entry, task))
    assert isinstance(provider.dialect.polled(entry, task, answer), Pending)


@pytest.mark.parametrize(("name", "url"), ALLOWED)
async def test_the_key_goes_to_the_documented_hosts(tmp_path: Path, name: str, url: str) -> None:
    provider, seen = real_provider(name, tmp_path)
    try:
        await poll_at(provider, name, url)
    finally:
        await provider.aclose()
    header, value = KEYS[name]
    [request] = seen
    assert request.url == httpx.URL(url) and request.headers[header] == value


@pytest.mark.parametrize(("name", "url", "why"), REFUSED)
async def test_the_key_goes_nowhere_else(tmp_path: Path, name: str, url: str, why: str) -> None:
    provider, seen = real_provider(name, tmp_path)
    try:
        with pytest.raises(UntrustedURL, match=why) as err:
            await poll_at(provider, name, url)
    finally:
        await provider.aclose()
    assert seen == []  # refused before anything was sent
    assert not err.value.retryable and err.value.kind == "malformed_response"
    assert KEYS[name][1].split()[-1] not in err.value.message


def test_the_operator_can_add_origins_for_a_providers_key() -> None:
    settings = Settings(
        bfl_api_key="k", bfl_base_url="http://127.0.0.1:1", provider_hosts={"bfl": ["http://localhost:2"]}
    )
    provider = HostedProvider(BFL, settings)
    provider.check_credential_url("GET", "http://localhost:2/v1/get_result?id=1")  # added: allowed
    with pytest.raises(UntrustedURL):
        provider.check_credential_url("GET", "http://localhost:3/v1/get_result?id=1")  # another port
    with pytest.raises(UntrustedURL):
        HostedProvider(BFL, Settings(bfl_api_key="k", bfl_base_url="http://127.0.0.1:1")).check_credential_url(
            "GET", "http://localhost:2/v1/get_result?id=1"
        )


async def test_an_answer_nested_deeper_than_the_json_parser_goes_is_no_body(tmp_path: Path) -> None:
    """A hostile upstream's answer nested past the JSON parser's depth reads as no body (the dialect
    then finds nothing in it: a malformed answer), never as an exception nobody classifies."""
    nested = b"[" * 200_000 + b"]" * 200_000
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=nested))
    provider = HostedProvider(BFL, Settings(data_dir=tmp_path, bfl_api_key="bfl_test"), transport=transport)
    entry = Catalog.load().resolve("bfl/flux.1-kontext-pro")[1]
    task = Task(id="1", data={"polling_url": "https://api.bfl.ai/v1/get_result?id=1"})
    try:
        answer = await provider.send(provider.dialect.poll(entry, task))
    finally:
        await provider.aclose()
    assert answer.status == 200 and answer.body is None


async def test_a_result_over_the_cap_is_a_bad_result_its_download_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No image Kontext makes is that large: the download stops at the cap, not at its end."""
    monkeypatch.setattr(hosted, "MAX_RESULT_BYTES", 1024 * 1024)
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for _ in range(8):  # 2 MiB on offer, in 256 KiB chunks
            sent.append(256 * 1024)
            yield b"\0" * (256 * 1024)

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body()))
    provider = HostedProvider(BFL, Settings(data_dir=tmp_path, bfl_api_key="bfl_test"), transport=transport)
    try:
        with pytest.raises(BadResult, match="the result is over 1 MiB"):
            await provider.download("https://delivery.example/results/1/sample.png")
    finally:
        await provider.aclose()
    assert sum(sent) <= 1024 * 1024 + 256 * 1024  # read up to the chunk that crossed the cap, no further
