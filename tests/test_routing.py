"""Router and circuit breaker, with in-memory providers: order, failover, moderation, exhaustion."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from PIL import Image

from kontext_gateway.breaker import CircuitBreaker
from kontext_gateway.catalog import Catalog
from kontext_gateway.config import Settings
from kontext_gateway.errors import GatewayError
from kontext_gateway.params import Size, SizeRequest
from kontext_gateway.providers.base import Attempt, ImageJob, ProviderImage, ProviderResult
from kontext_gateway.providers.remote import Misconfigured, Moderated, RateLimited, ServerError
from kontext_gateway.routing import Router

PRO = Catalog.load().get("flux.1-kontext-pro")


@dataclass
class Scripted:
    """A provider whose outcomes are scripted: each call pops the next exception or succeeds."""

    name: str
    outcomes: list[Exception | None] = field(default_factory=list)
    calls: int = 0
    configured: bool = True
    records_attempts: bool = True

    def handling(self, entry) -> dict:
        return {}

    def available(self, entry) -> bool:
        return self.configured

    def unavailable_reason(self, entry) -> str:
        return "not configured"

    def unsupported(self, entry, job) -> str | None:
        return "takes at most 1 input image(s)" if len(job.images) > entry.max_input_images else None

    async def generate(self, entry, job: ImageJob) -> ProviderResult:
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else None
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


def job(images: int = 0) -> ImageJob:
    return ImageJob(
        request_id="req_t",
        model=PRO,
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
    r.breaker.clock = lambda: now[0]
    for _ in range(2):  # two failures open fal's breaker; bfl serves
        j = job()
        assert (await r.run(r.candidates(PRO, "text-to-image", j), j))[0].provider == "bfl"
    assert r.breaker.state("fal/flux.1-kontext-pro") == "open"
    j = job()
    await r.run(r.candidates(PRO, "text-to-image", j), j)
    assert fal.calls == 2 and j.attempts[0].error_class == "circuit_open"  # skipped while open
    now[0] = 31.0  # half-open: one probe goes through, succeeds, closes the breaker
    j = job()
    assert (await r.run(r.candidates(PRO, "text-to-image", j), j))[0].provider == "fal"
    assert r.breaker.state("fal/flux.1-kontext-pro") == "closed" and fal.calls == 3


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
