"""Router and circuit breaker, with in-memory providers: order, failover, moderation, exhaustion."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from PIL import Image

from kontext_gateway.breaker import Admission, CircuitBreaker
from kontext_gateway.catalog import Catalog
from kontext_gateway.config import Settings
from kontext_gateway.errors import GatewayError
from kontext_gateway.params import Size, SizeRequest
from kontext_gateway.providers.base import Attempt, ImageJob, ProviderImage, ProviderResult, Refusal
from kontext_gateway.providers.errors import Misconfigured, Moderated, RateLimited, ServerError
from kontext_gateway.routing import Router
from kontext_gateway.store.records import Lane

PRO = Catalog.load().get("flux.1-kontext-pro")
DEV = Catalog.load().get("flux.1-kontext-dev")


@dataclass
class Scripted:
    """A provider whose outcomes are scripted: each call pops the next exception or succeeds."""

    name: str
    outcomes: list[Exception | None] = field(default_factory=list)
    calls: int = 0
    configured: bool = True
    records: bool = True  # record its own attempt (as hosted providers do, one per upstream task)
    lane: Lane = Lane.HOSTED

    def handling(self, entry) -> dict:
        return {}

    def available(self, entry) -> bool:
        return self.configured

    def unavailable_reason(self, entry) -> str:
        return "not configured"

    def unsupported(self, entry, job) -> Refusal | None:
        if len(job.images) > entry.max_input_images:
            return Refusal("takes at most 1 input image(s)", param="image")
        return None

    async def generate(self, entry, job: ImageJob) -> ProviderResult:
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if self.records:
            job.attempts.append(
                Attempt(
                    self.name,
                    entry.config_key,
                    "failed" if outcome else "succeeded",
                    1,
                    error_class=getattr(outcome, "kind", None),
                )
            )
        if outcome is not None:
            raise outcome
        return ProviderResult(images=[ProviderImage(data=b"x", format="png")], size=Size(8, 8))

    async def aclose(self) -> None:
        pass


def job(images: int = 0, model=PRO) -> ImageJob:
    return ImageJob(
        request_id="req_t",
        model=model,
        mode="edit" if images else "text-to-image",
        prompt="p",
        images=[Image.new("RGB", (8, 8))] * images,
        size=SizeRequest(None),
        n=1,
        seed=1,
        output_format="png",
        output_compression=None,
    )


def router(settings: Settings | None = None, **providers: Scripted) -> Router:
    return Router(dict(providers), settings or Settings(breaker_failures=2, breaker_reset_s=30))


def order(r: Router, j: ImageJob | None = None) -> list[str]:
    j = j or job()
    return [e.config_key for e, _ in r.candidates(PRO, j.mode, j)]


def test_candidates_need_credentials_and_capacity() -> None:
    r = router(replicate=Scripted("replicate"), fal=Scripted("fal", configured=False))
    assert set(order(r)) == {"replicate/flux.1-kontext-pro"}
    with pytest.raises(GatewayError) as err:
        router(fal=Scripted("fal", configured=False)).candidates(PRO, "text-to-image", job())
    assert err.value.status == 503 and "fal/flux.1-kontext-pro: not configured" in err.value.message
    # Replicate takes 2 images, Fireworks 1: three images leave only fal and BFL.
    r = router(**{n: Scripted(n) for n in ("replicate", "fireworks", "fal", "bfl")})
    assert set(order(r, job(images=3))) == {"fal/flux.1-kontext-pro", "bfl/flux.1-kontext-pro"}


def test_dev_text_to_image_names_every_route_and_why() -> None:
    """Replicate's and fal's [dev] routes only edit: with their keys set, text-to-image still needs
    the local weights, and the 503 says so of every route, not only of the local one."""
    r = router(replicate=Scripted("replicate"), fal=Scripted("fal"), local=Scripted("local", configured=False))
    with pytest.raises(GatewayError) as err:
        r.candidates(DEV, "text-to-image", job(model=DEV))
    e = err.value
    assert e.status == 503 and e.code == "provider_unavailable"
    for key in ("replicate/flux.1-kontext-dev", "fal/flux.1-kontext-dev", "fal/flux.1-kontext-dev-lora"):
        assert f"{key}: edits only" in e.message
    assert "local/flux.1-kontext-dev: not configured" in e.message
    # Edits have routes: the configured hosted ones serve them.
    edit = job(images=1, model=DEV)
    assert {entry.provider for entry, _ in r.candidates(DEV, "edit", edit)} == {"replicate", "fal"}


def test_no_route_for_the_mode_is_a_400_configured_or_not() -> None:
    """Without the local engine, nothing could ever make [dev] text-to-image: not an outage (503)
    but a request this gateway cannot serve (400 unsupported_mode), naming each route."""
    r = router(replicate=Scripted("replicate"), fal=Scripted("fal", configured=False))
    with pytest.raises(GatewayError) as err:
        r.candidates(DEV, "text-to-image", job(model=DEV))
    e = err.value
    assert e.status == 400 and e.code == "unsupported_mode" and e.param == "model"
    assert "replicate/flux.1-kontext-dev: edits only" in e.message
    assert "fal/flux.1-kontext-dev: edits only" in e.message
    assert "local/flux.1-kontext-dev: the gateway has no local adapter" in e.message
    # Naming one provider of the model that does not do the mode: the same answer.
    with pytest.raises(GatewayError) as err:
        r.candidates(DEV, "text-to-image", job(model=DEV), provider="replicate")
    assert err.value.code == "unsupported_mode" and "edits only" in err.value.message


def test_a_request_no_route_could_take_is_a_400_even_unconfigured() -> None:
    # Three images: Replicate takes 2, Fireworks 1. Configuring either would not help.
    r = router(replicate=Scripted("replicate", configured=False), fireworks=Scripted("fireworks", configured=False))
    with pytest.raises(GatewayError) as err:
        r.candidates(PRO, "edit", job(images=3))
    e = err.value
    assert e.status == 400 and e.code == "unsupported_by_providers"
    # (the scripted providers word their refusal alike)
    assert "replicate/flux.1-kontext-pro: takes at most 1 input image(s) (and not configured)" in e.message
    assert e.param == "image"  # every route refuses for the same parameter: the error names it


def test_a_value_one_route_refuses_goes_to_another() -> None:
    class Picky(Scripted):
        def unsupported(self, entry, job) -> Refusal | None:
            return Refusal("cfg_scale=0.5 is outside what it takes: 1 to 20", param="cfg_scale")

    r = router(fal=Picky("fal"), bfl=Scripted("bfl"))
    assert order(r) == ["bfl/flux.1-kontext-pro"]
    with pytest.raises(GatewayError) as err:
        router(fal=Picky("fal")).candidates(PRO, "text-to-image", job())
    e = err.value
    assert e.status == 400 and e.param == "cfg_scale" and "1 to 20" in e.message


async def test_the_router_records_a_run_that_recorded_nothing() -> None:
    """The local engine (and a hosted run that failed before any task) records no attempt itself."""
    quiet = Scripted("fal", [ServerError("boom", status=503)], records=False)
    r = router(Settings(provider_priority={"fal": -1}), fal=quiet, bfl=Scripted("bfl", records=False))
    j = job()
    await r.run(r.candidates(PRO, "text-to-image", j), j)
    assert [(a.provider, a.outcome, a.error_class) for a in j.attempts] == [
        ("fal", "failed", "server_error"),
        ("bfl", "succeeded", None),
    ]


def test_prospective_candidates_are_those_that_would_serve_once_configured() -> None:
    names = ("replicate", "fireworks", "fal", "bfl")
    r = router(**{n: Scripted(n, configured=False) for n in names})
    with pytest.raises(GatewayError) as err:
        r.candidates(PRO, "edit", job(images=2))
    assert err.value.status == 503
    would = {e.config_key for e, _ in r.candidates(PRO, "edit", job(images=2), prospective=True)}
    assert would == {"replicate/flux.1-kontext-pro", "fal/flux.1-kontext-pro", "bfl/flux.1-kontext-pro"}
    # Once one is configured, only the configured ones are candidates, prospective or not.
    r.providers["bfl"].configured = True  # type: ignore[attr-defined]
    assert order(r, job(images=2)) == ["bfl/flux.1-kontext-pro"]
    assert [e.config_key for e, _ in r.candidates(PRO, "edit", job(images=2), prospective=True)] == [
        "bfl/flux.1-kontext-pro"
    ]


def test_order_priority_then_latency_then_weights() -> None:
    names = ("replicate", "fireworks", "fal", "bfl")
    r = router(Settings(provider_priority={"bfl": -1}), **{n: Scripted(n) for n in names})
    assert order(r)[0] == "bfl/flux.1-kontext-pro"  # all cost $0.04: priority decides
    r = router(**{n: Scripted(n) for n in names})
    r.observe("fal/flux.1-kontext-pro", 0.5)
    r.observe("replicate/flux.1-kontext-pro", 9.0)
    r.observe("fireworks/flux.1-kontext-pro", 3.0)
    r.observe("bfl/flux.1-kontext-pro", 5.0)
    assert order(r) == [
        "fal/flux.1-kontext-pro",
        "fireworks/flux.1-kontext-pro",
        "bfl/flux.1-kontext-pro",
        "replicate/flux.1-kontext-pro",
    ]
    weighted = router(Settings(provider_weights={"fal": 9.0, "bfl": 1.0}), fal=Scripted("fal"), bfl=Scripted("bfl"))
    firsts = [order(weighted)[0] for _ in range(400)]
    share = firsts.count("fal/flux.1-kontext-pro") / len(firsts)
    assert 0.8 < share < 0.98  # 9:1 weights: about 90 % of requests start with fal


async def test_failover_records_every_attempt() -> None:
    fal, bfl = Scripted("fal", [ServerError("boom", status=503)]), Scripted("bfl")
    r = router(Settings(provider_priority={"fal": -1}), fal=fal, bfl=bfl)
    j = job()
    entry, _ = await r.run(r.candidates(PRO, "text-to-image", j), j)
    assert entry.provider == "bfl" and [a.outcome for a in j.attempts] == ["failed", "succeeded"]


async def test_moderation_is_not_failed_over() -> None:
    fal, bfl = Scripted("fal", [Moderated("flagged: violence")]), Scripted("bfl")
    r = router(Settings(provider_priority={"fal": -1}), fal=fal, bfl=bfl)
    j = job()
    with pytest.raises(GatewayError) as err:
        await r.run(r.candidates(PRO, "text-to-image", j), j)
    assert err.value.status == 400 and err.value.code == "content_policy_violation"
    assert "flagged: violence" in err.value.message and bfl.calls == 0


async def test_all_exhausted_is_502_listing_attempts_with_retry_after() -> None:
    fal = Scripted("fal", [RateLimited("slow down", status=429, retry_after=7)])
    bfl = Scripted("bfl", [Misconfigured("credentials rejected", status=401)])
    r = router(Settings(provider_priority={"fal": -1}), fal=fal, bfl=bfl)
    j = job()
    with pytest.raises(GatewayError) as err:
        await r.run(r.candidates(PRO, "text-to-image", j), j)
    e = err.value
    assert e.status == 502 and e.code == "all_providers_exhausted"
    assert (
        "fal/flux.1-kontext-pro failed (rate_limited" in e.message
        and "bfl/flux.1-kontext-pro failed (authentication" in e.message
    )
    assert e.headers["retry-after"] == "7" and e.headers["x-should-retry"] == "true"


async def test_breaker_opens_and_probes_back_in() -> None:
    now = [0.0]
    fal = Scripted("fal", [ServerError("down")] * 2)
    bfl = Scripted("bfl")
    r = router(Settings(provider_priority={"fal": -1}, breaker_failures=2, breaker_reset_s=30), fal=fal, bfl=bfl)
    r.health.breaker.clock = lambda: now[0]
    for _ in range(2):  # two failures open fal's breaker; bfl serves
        j = job()
        assert (await r.run(r.candidates(PRO, "text-to-image", j), j))[0].provider == "bfl"
    assert r.health.state("fal/flux.1-kontext-pro") == "open"
    j = job()
    await r.run(r.candidates(PRO, "text-to-image", j), j)
    assert fal.calls == 2 and j.attempts[0].error_class == "circuit_open"  # skipped while open
    now[0] = 31.0  # half-open: one probe goes through, succeeds, closes the breaker
    j = job()
    assert (await r.run(r.candidates(PRO, "text-to-image", j), j))[0].provider == "fal"
    assert r.health.state("fal/flux.1-kontext-pro") == "closed" and fal.calls == 3


@dataclass
class Held(Scripted):
    """A provider whose every call waits until the test ends it: each call's end, a future, is put on
    `entered`; the test sets its result (an exception to raise, or None to succeed)."""

    entered: asyncio.Queue[asyncio.Future[Exception | None]] = field(default_factory=asyncio.Queue)

    async def generate(self, entry, job: ImageJob) -> ProviderResult:
        end: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.entered.put_nowait(end)
        self.outcomes.append(await end)
        return await super().generate(entry, job)


async def started(r: Router, provider: Held) -> tuple[asyncio.Task, asyncio.Future[Exception | None]]:
    """A request sent through `r`, once inside its call to `provider`; and that call's end."""
    j = job()
    task = asyncio.create_task(r.run(r.candidates(PRO, "text-to-image", j), j))
    return task, await provider.entered.get()


async def test_a_request_let_through_while_closed_does_not_free_the_probe() -> None:
    """A request sent while the breaker was closed, ending without a verdict (moderation) once the
    breaker has opened and gone half-open, leaves the probe that another request holds taken: still
    one probe at a time."""
    now = [0.0]
    fal = Held("fal")
    r = router(Settings(breaker_failures=1, breaker_reset_s=30), fal=fal)
    r.health.breaker.clock = lambda: now[0]
    key = "fal/flux.1-kontext-pro"
    early, early_end = await started(r, fal)  # let through while closed
    failing, failing_end = await started(r, fal)
    failing_end.set_result(ServerError("down", status=503))
    with pytest.raises(GatewayError):
        await failing
    assert r.health.state(key) == "open"
    now[0] = 31.0
    probe, probe_end = await started(r, fal)  # the half-open breaker's one probe
    early_end.set_result(Moderated("flagged"))
    with pytest.raises(GatewayError) as err:
        await early
    assert err.value.code == "content_policy_violation"
    assert r.health.state(key) == "half_open" and await r.health.allow(key) is None  # the probe is still out
    probe_end.set_result(None)
    assert (await probe)[0].provider == "fal"
    assert r.health.state(key) == "closed" and await r.health.allow(key) is Admission.CLOSED


def test_breaker_half_open_allows_one_probe_and_reopens_on_failure() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=3, reset_s=10, clock=lambda: now[0])
    for _ in range(3):
        b.failure("k")
    assert b.state("k") == "open" and not b.allow("k")
    now[0] = 10.0
    assert b.state("k") == "half_open" and b.allow("k") and not b.allow("k")  # one probe at a time
    b.failure("k")
    assert b.state("k") == "open"
    now[0] = 25.0
    assert b.allow("k")
    b.success("k")
    assert b.state("k") == "closed" and b.allow("k")
