"""RateLimiter against each storage: in-process memory, a real Redis, a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from conftest import reachable, throwaway_postgres_database
from kontext_gateway.ratelimit import Admission, RateLimiter

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_reachable() -> str | None:
    return reachable("Redis", 6379)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    # Sync fixture: the helper drives asyncio.run itself, so it must not run inside the test's loop.
    with throwaway_postgres_database("kontext_rl") as url:
        yield url


@pytest.fixture(params=["memory", "redis", "postgres"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    if request.param == "redis":
        reason = redis_reachable()
        if reason:
            pytest.skip(reason)
        return REDIS_URL
    return request.getfixturevalue("postgres_url")


def unique(label: str) -> str:
    # Unique per run, with the ':' and '-' real key names carry, so Redis leftovers never interfere.
    return f"{label}:key-{uuid.uuid4().hex[:12]}"


async def test_admits_the_limit_then_denies_with_retry_after(url: str) -> None:
    limiter = RateLimiter(url)
    try:
        name = unique("rpm")
        started = time.monotonic()
        for _ in range(5):
            assert await limiter.hit(name, 5) == Admission(True)
        denied = await limiter.hit(name, 5)
        # The wait counts from the first hit: what the hits took (a busy machine's seconds) is off it.
        took = time.monotonic() - started + 0.1  # and a little for the stores' own clocks
        assert not denied.allowed
        assert denied.retry_after_s is not None and 0 < denied.retry_after_s <= 60
        if url.startswith("postgres"):
            # PostgreSQL keeps a sliding log: a unit comes back when the first hit is 60 s old.
            assert 60 - took <= denied.retry_after_s
        else:
            assert 12 - took <= denied.retry_after_s <= 12.1  # GCRA: one unit is back every 60/5 = 12 s
    finally:
        await limiter.aclose()


async def test_weight_above_limit_is_never_admissible(url: str) -> None:
    limiter = RateLimiter(url)
    try:
        name = unique("ipm")
        assert await limiter.hit(name, 5, weight=6) == Admission(False, None)
        # ...and it spent nothing: the full allowance is still there.
        assert (await limiter.hit(name, 5, weight=5)).allowed
    finally:
        await limiter.aclose()


async def test_denied_hit_consumes_nothing(url: str) -> None:
    limiter = RateLimiter(url)
    try:
        name = unique("ipm")
        assert (await limiter.hit(name, 5, weight=3)).allowed
        denied = await limiter.hit(name, 5, weight=3)  # only 2 left
        assert not denied.allowed and denied.retry_after_s is not None and denied.retry_after_s > 0
        assert (await limiter.hit(name, 5, weight=2)).allowed  # the denial took none of the 2
        assert not (await limiter.hit(name, 5)).allowed
    finally:
        await limiter.aclose()


async def test_names_are_independent(url: str) -> None:
    limiter = RateLimiter(url)
    try:
        a, b = unique("rpm"), unique("rpm")
        assert (await limiter.hit(a, 2, weight=2)).allowed
        assert not (await limiter.hit(a, 2)).allowed
        assert (await limiter.hit(b, 2, weight=2)).allowed
    finally:
        await limiter.aclose()


async def test_instances_on_one_url_share_the_allowance(url: str) -> None:
    if url == "memory":
        pytest.skip("memory limits are per process by design")
    # Two limiters on one URL stand in for two gateway processes.
    first, second = RateLimiter(url), RateLimiter(url)
    try:
        name = unique("rpm")
        for _ in range(3):
            assert (await first.hit(name, 5)).allowed
        assert (await second.hit(name, 5, weight=2)).allowed
        assert not (await first.hit(name, 5)).allowed
        assert not (await second.hit(name, 5)).allowed
    finally:
        await first.aclose()
        await second.aclose()


async def test_concurrent_hits_never_over_admit(url: str) -> None:
    limiters = [RateLimiter(url), RateLimiter(url)] if url != "memory" else [RateLimiter(url)]
    try:
        name = unique("rpm")
        results = await asyncio.gather(*(limiters[i % len(limiters)].hit(name, 5) for i in range(12)))
        assert sum(r.allowed for r in results) == 5
        assert all(r.retry_after_s and r.retry_after_s > 0 for r in results if not r.allowed)
    finally:
        for limiter in limiters:
            await limiter.aclose()


@pytest.mark.parametrize("bad", ["mysql://localhost/db", "sqlite:///x.db", "http://redis:6379", ""])
def test_bad_url_scheme_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="redis://"):
        RateLimiter(bad)


async def test_redis_judges_hits_by_its_own_clock() -> None:
    """Two gateways whose clocks differ by half a minute share one allowance exactly: the time that
    counts is Redis's, at the moment it applies each hit (the callers' stamps could arrive out of
    order, and the later-stamped one first would make GCRA refuse the other)."""
    if reason := reachable("Redis", 6379):
        pytest.skip(reason)
    slow, fast = RateLimiter("redis://127.0.0.1:6379/0"), RateLimiter("redis://127.0.0.1:6379/0")
    try:
        name = unique("skew")
        for limiter, skew_ms in ((slow, -30_000), (fast, 30_000)):
            bucket = limiter._bucket(name, 5).bucket
            clock = bucket.now
            bucket.now = lambda clock=clock, skew_ms=skew_ms: clock() + skew_ms
        results = [await (fast if i % 2 else slow).hit(name, 5) for i in range(12)]
        assert sum(r.allowed for r in results) == 5
        assert all(r.allowed for r in results[:5])  # the first five, whichever gateway stamped them
    finally:
        await slow.aclose()
        await fast.aclose()
