"""Provider health shared across processes, against a real Redis and a real PostgreSQL: two
SharedProviderHealth objects (or two Routers) on one store stand in for two gateway processes.

The store's clock cannot be moved, so no test waits on it with a tight margin: the views are read on
every call (`refresh_s=0`), breakers are opened with a long `reset_s`, and a test that needs the
half-open state shortens `reset_s` once the breaker is open (or polls with a generous deadline).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from conftest import PATIENCE_S, reachable, throwaway_postgres_database
from kontext_gateway.breaker import Admission
from kontext_gateway.config import Settings
from kontext_gateway.errors import GatewayError
from kontext_gateway.gateway import Gateway
from kontext_gateway.provider_health.backends import open_health_store, open_provider_health
from kontext_gateway.provider_health.local import ProviderHealth
from kontext_gateway.provider_health.redis_store import RedisHealthStore
from kontext_gateway.provider_health.shared import SharedProviderHealth
from kontext_gateway.provider_health.state import HealthStore
from kontext_gateway.providers.errors import Moderated, ServerError
from kontext_gateway.routing import Router
from kontext_gateway.store.db import Database
from kontext_gateway.store.provider_health import PostgresHealthStore
from kontext_gateway.store.records import HealthSnapshot, LatencyBatch
from test_routing import PRO, Held, Scripted, job, started

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY = "fal/flux.1-kontext-pro"


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway database, migrated as the gateway migrates its own (the table comes from there)."""
    with throwaway_postgres_database("kontext_health") as url:

        async def migrate() -> None:
            db = Database(Settings(database_url=url).resolved_database_url())
            await db.start()
            await db.close()

        asyncio.run(migrate())
        yield url


@pytest.fixture(params=["redis", "postgres"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "redis":
        if reason := reachable("Redis", 6379):
            pytest.skip(reason)
        return "redis", REDIS_URL
    return "postgres", request.getfixturevalue("postgres_url")


@pytest.fixture
async def new_store(backend: tuple[str, str]) -> AsyncIterator[Callable[[], HealthStore]]:
    """Makes clients of one fresh shared store (each one a process's), closed afterwards."""
    kind, url = backend
    made: list[HealthStore] = []
    hash_key = f"kontext:health:test:{uuid.uuid4().hex[:12]}"
    if kind == "postgres":
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("DELETE FROM provider_health")
        finally:
            await conn.close()

    def make() -> HealthStore:
        store: HealthStore = RedisHealthStore(url, key=hash_key) if kind == "redis" else PostgresHealthStore(url)
        made.append(store)
        return store

    yield make
    if kind == "redis":
        from redis.asyncio import Redis

        client = Redis.from_url(url)
        await client.delete(hash_key)
        await client.aclose()
    for store in made:
        await store.aclose()


def shared(store: HealthStore, *, failures: int = 3, reset_s: float = 30.0, **kw: Any) -> SharedProviderHealth:
    # refresh_s=0: every allow() reads the store, so what one process wrote the other sees at once.
    kw.setdefault("refresh_s", 0.0)
    kw.setdefault("probe_lease_s", 60.0)
    return SharedProviderHealth(failures, reset_s, store, **kw)


async def open_breaker(h: SharedProviderHealth, key: str = KEY) -> None:
    for _ in range(h.threshold):
        await h.failure(key)


def gauge(key: str) -> float | None:
    return REGISTRY.get_sample_value("kontext_circuit_state", {"provider": key})


async def test_failures_seen_by_each_open_the_breaker_for_both(new_store: Callable[[], HealthStore]) -> None:
    a, b = shared(new_store()), shared(new_store())
    key = f"fal/{uuid.uuid4().hex[:8]}"
    await a.failure(key)
    await a.failure(key)
    assert await b.allow(key) and await a.allow(key)  # two of three: still closed
    await b.failure(key)  # the third, seen by the other process
    assert not await a.allow(key) and not await b.allow(key)
    assert a.state(key) == b.state(key) == "open"
    assert gauge(key) == 2  # each process publishes the state it acts on


async def test_one_probe_across_processes_and_its_success_closes_for_both(
    new_store: Callable[[], HealthStore],
) -> None:
    a, b = shared(new_store()), shared(new_store())
    await open_breaker(a)
    assert not await b.allow(KEY)
    a.reset_s = b.reset_s = 0.0  # the open period is over (the store's clock cannot be moved)
    assert a.state(KEY) == b.state(KEY) == "half_open"
    granted = await asyncio.gather(a.allow(KEY), b.allow(KEY), a.allow(KEY), b.allow(KEY))
    assert [g is Admission.PROBE for g in granted].count(True) == 1 and granted.count(None) == 3  # one probe
    prober, other = (a, b) if granted[0] or granted[2] else (b, a)
    assert not await other.allow(KEY) and not await prober.allow(KEY)  # the lease runs: no second probe
    await prober.success(KEY)
    assert await other.allow(KEY) and await prober.allow(KEY)
    assert a.state(KEY) == b.state(KEY) == "closed"


async def test_a_failed_probe_reopens_for_both(new_store: Callable[[], HealthStore]) -> None:
    a, b = shared(new_store()), shared(new_store())
    await open_breaker(b)
    a.reset_s = b.reset_s = 0.0
    assert await a.allow(KEY)
    await a.failure(KEY)  # the probe failed: open again, from now, for another reset_s
    a.reset_s = b.reset_s = 30.0
    assert not await b.allow(KEY) and not await a.allow(KEY)
    assert a.state(KEY) == b.state(KEY) == "open"
    a.reset_s = b.reset_s = 0.0
    assert await b.allow(KEY)  # the failed probe gave its lease up: the next probe may go


async def test_a_crashed_probers_lease_runs_out(new_store: Callable[[], HealthStore]) -> None:
    a, b = shared(new_store(), probe_lease_s=3.0), shared(new_store(), probe_lease_s=3.0)
    await open_breaker(a)
    a.reset_s = b.reset_s = 0.0
    assert await a.allow(KEY)  # a takes the probe, then its process dies without a verdict
    assert not await b.allow(KEY)  # (asked within the lease's 3 s)
    # The lease runs out on the store's clock: b takes the probe. Polled, with a generous deadline.
    deadline = time.monotonic() + PATIENCE_S
    while not await b.allow(KEY):
        assert time.monotonic() < deadline, "the dead prober's lease never ran out"
        await asyncio.sleep(0.05)


async def test_a_released_probe_frees_the_lease_at_once(new_store: Callable[[], HealthStore]) -> None:
    a, b = shared(new_store()), shared(new_store())
    await open_breaker(a)
    a.reset_s = b.reset_s = 0.0
    assert await a.allow(KEY) and not await b.allow(KEY)
    await a.release(KEY)  # e.g. moderation: no verdict on the provider
    assert await b.allow(KEY)


async def test_a_request_let_through_while_closed_leaves_the_shared_probe_taken(
    new_store: Callable[[], HealthStore],
) -> None:
    """A request that process one sent while the breaker was closed, ending in moderation while
    process one's probe is out, does not give the store's probe lease back: process two may not probe
    too."""
    fal = Held("fal")
    one = Router({"fal": fal}, Settings(breaker_failures=1), shared(new_store(), failures=1))
    two = shared(new_store(), failures=1)
    early, early_end = await started(one, fal)  # let through while closed
    failing, failing_end = await started(one, fal)
    failing_end.set_result(ServerError("down", status=503))
    with pytest.raises(GatewayError):
        await failing
    one.health.reset_s = two.reset_s = 0.0  # the open period is over
    probe, probe_end = await started(one, fal)  # the one probe, process one's
    early_end.set_result(Moderated("flagged"))
    with pytest.raises(GatewayError) as err:
        await early
    assert err.value.code == "content_policy_violation"
    assert await two.allow(KEY) is None  # the lease is still the probe's
    probe_end.set_result(None)
    assert (await probe)[0].provider == "fal"
    assert await two.allow(KEY) is Admission.CLOSED


async def test_latency_learned_by_one_orders_routes_for_the_other(new_store: Callable[[], HealthStore]) -> None:
    names = ("replicate", "fireworks", "fal", "bfl")
    one = Router({n: Scripted(n) for n in names}, Settings(), shared(new_store()))
    two = Router({n: Scripted(n) for n in names}, Settings(), shared(new_store()))
    for name, seconds in (("fal", 0.5), ("replicate", 9.0), ("fireworks", 3.0), ("bfl", 5.0)):
        one.observe(f"{name}/flux.1-kontext-pro", seconds)
    await one.health.allow(KEY)  # the next request's refresh writes the samples
    await two.health.allow(KEY)
    j = job()
    assert [e.config_key for e, _ in two.candidates(PRO, j.mode, j)] == [
        "fal/flux.1-kontext-pro",
        "fireworks/flux.1-kontext-pro",
        "bfl/flux.1-kontext-pro",
        "replicate/flux.1-kontext-pro",
    ]
    # One EWMA for all, updated atomically: the other's sample folds into it.
    two.observe("fal/flux.1-kontext-pro", 3.0)
    await two.health.allow(KEY)
    await one.health.allow(KEY)
    assert one.health.latency("fal/flux.1-kontext-pro") == pytest.approx(0.8 * 0.5 + 0.2 * 3.0)


async def test_two_routers_share_the_breaker(new_store: Callable[[], HealthStore]) -> None:
    """Router A's failures take fal out of rotation for router B: B skips it without calling it."""
    settings = Settings(provider_priority={"fal": -1}, breaker_failures=2)
    fal_a = Scripted("fal", [ServerError("down", status=503)] * 2)
    fal_b = Scripted("fal")
    one = Router({"fal": fal_a, "bfl": Scripted("bfl")}, settings, shared(new_store(), failures=2))
    two = Router({"fal": fal_b, "bfl": Scripted("bfl")}, settings, shared(new_store(), failures=2))
    for _ in range(2):
        j = job()
        assert (await one.run(one.candidates(PRO, j.mode, j), j))[0].provider == "bfl"
    j = job()
    entry, _ = await two.run(two.candidates(PRO, j.mode, j), j)
    assert entry.provider == "bfl" and fal_b.calls == 0 and j.attempts[0].error_class == "circuit_open"


class Counting:
    """A store that counts the steps asked of it, and can be made to fail like an unreachable one."""

    def __init__(self, inner: HealthStore) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.down = False

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise ConnectionError("store down (simulated)")

    async def snapshot(self) -> HealthSnapshot:
        self._step("snapshot")
        return await self.inner.snapshot()

    async def failure(self, key: str, threshold: int, probe: str | None) -> HealthSnapshot:
        self._step("failure")
        return await self.inner.failure(key, threshold, probe)

    async def success(self, key: str) -> None:
        self._step("success")
        await self.inner.success(key)

    async def acquire_probe(self, key: str, reset_s: float, lease_s: float, token: str) -> bool:
        self._step("acquire_probe")
        return await self.inner.acquire_probe(key, reset_s, lease_s, token)

    async def release_probe(self, key: str, token: str) -> None:
        self._step("release_probe")
        await self.inner.release_probe(key, token)

    async def add_latency(self, batches: dict[str, LatencyBatch]) -> None:
        self._step("add_latency")
        await self.inner.add_latency(batches)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_healthy_provider_costs_no_round_trip(new_store: Callable[[], HealthStore]) -> None:
    now = [0.0]
    store = Counting(new_store())
    h = shared(store, refresh_s=1.0, clock=lambda: now[0])
    assert await h.allow(KEY)  # the first request reads the view
    assert store.calls == ["snapshot"]
    for _ in range(100):  # requests within the refresh interval to a closed breaker, succeeding
        assert await h.allow(KEY)
        await h.success(KEY)
        h.observe(KEY, 0.4)
    assert store.calls == ["snapshot"]
    now[0] = 1.0  # the interval is over: the next request writes the folded samples and reads the view
    assert await h.allow(KEY)
    assert store.calls == ["snapshot", "add_latency", "snapshot"]
    await h.failure(KEY)  # a failure is written at once; the success after it resets the count
    await h.success(KEY)
    assert store.calls[3:] == ["failure", "success"]
    await h.success(KEY)
    assert store.calls[5:] == []


async def test_store_outage_falls_back_to_local_state_and_recovers(
    new_store: Callable[[], HealthStore], caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    store = Counting(new_store())
    h = shared(store, failures=2, refresh_s=1.0, retry_s=5.0, clock=lambda: now[0])
    assert await h.allow(KEY)
    store.down = True
    with caplog.at_level(logging.INFO, logger="kontext_gateway.provider_health.shared"):
        await h.failure(KEY)  # not written: the store is down; this process's own breaker counts it
        await h.failure(KEY)
        assert not await h.allow(KEY) and h.state(KEY) == "open"  # local behaviour, no exception
        calls = len(store.calls)
        now[0] = 3.0
        assert not await h.allow(KEY)
        assert len(store.calls) == calls  # not asked again before retry_s
        now[0] = 6.0
        assert not await h.allow(KEY)  # asked again, still down
        store.down = False
        now[0] = 12.0
        assert await h.allow(KEY)  # back: the shared state (never told of the outage's failures) decides
        assert h.state(KEY) == "closed"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()  # logged once per outage
    assert any("answers again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "postgresql://postgres@127.0.0.1:1/test"], ids=["redis", "postgres"]
)
async def test_unreachable_store_routes_on_local_state(url: str) -> None:
    """Nothing listens there: the gateway routes as a single process would, with no error."""
    health = open_provider_health(Settings(provider_health_url=url, breaker_failures=2))
    assert isinstance(health, SharedProviderHealth)
    fal = Scripted("fal", [ServerError("down", status=503)] * 2)
    bfl = Scripted("bfl")
    r = Router({"fal": fal, "bfl": bfl}, Settings(provider_priority={"fal": -1}), health)
    try:
        for _ in range(3):
            j = job()
            assert (await r.run(r.candidates(PRO, j.mode, j), j))[0].provider == "bfl"
        assert fal.calls == 2 and health.state(KEY) == "open"  # the local breaker opened after two
        r.observe(KEY, 1.0)
        assert health.latency(KEY) == 1.0
    finally:
        await health.aclose()


def test_memory_is_the_default_and_is_this_process_alone() -> None:
    health = open_provider_health(Settings())
    assert type(health) is ProviderHealth and health.breaker.publish
    assert open_health_store("memory") is None and open_health_store(None) is None
    assert type(Router({}, Settings()).health) is ProviderHealth


@pytest.mark.parametrize("bad", ["mysql://localhost/db", "sqlite:///x.db", "http://redis:6379", ""])
def test_bad_url_scheme_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="redis://"):
        open_health_store(bad)


async def test_the_gateway_shares_health_as_configured_and_closes_its_client(
    backend: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = backend
    gw = Gateway(Settings(data_dir=tmp_path, provider_health_url=url))
    assert isinstance(gw.health, SharedProviderHealth) and gw.router.health is gw.health
    closed: list[bool] = []
    real_close = gw.health.store.aclose

    async def aclose() -> None:
        closed.append(True)
        await real_close()

    monkeypatch.setattr(gw.health.store, "aclose", aclose)
    await gw.start(workers=False)
    try:
        assert await gw.health.allow(f"fal/{uuid.uuid4().hex[:8]}") and gw.health.state(KEY) == "closed"
        assert not gw.health._down  # it read the shared store
    finally:
        await gw.close()
    assert closed == [True]
