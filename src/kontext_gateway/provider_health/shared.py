"""Provider health shared by every gateway process on one Redis or PostgreSQL (`provider_health_url`):
failures counted across the processes open a breaker for all of them, one process at a time probes it
in half-open, a success closes it for all, and one latency EWMA per route orders routes everywhere.

Cheap on the hot path. Each process keeps a local view of the shared rows, read in one round trip at
most every `refresh_s`, by the first request that finds it stale (requests arriving meanwhile use the
view as it is, never waiting). A request to a closed breaker costs no round trip, and a success where
the view says closed with no failures writes nothing. The store is written only on a failure (one
round trip, which brings the key's row back), on a success after failures or as the probe, to take or
give up the half-open probe, and for latency samples, folded per key and written with the next refresh.

What that staleness allows, each for at most `refresh_s`: a process may still send requests to a
provider another process has just seen fail (its own failures still count, and open the breaker for
everyone); it may still skip a provider another process's probe has just closed; a success here does
not reset failures other processes counted since the last refresh (so the failures that open a breaker
are consecutive within that window, not exactly). Open to half-open is judged by the store's clock:
the view carries the offset between it and this process's clock, and the store itself decides, on its
own clock, who gets the probe.

The probe's lease runs `probe_lease_s`: a prober that crashed holds it until then; a live probe still
running after that may be joined by one more (one per lease period).

When the store fails or does not answer within `timeout_s`, the process logs it once and decides with
its own breakers (told every outcome all along, so they hold what this process saw) and its own latency
EWMAs, trying the store again every `retry_s`: no request fails because the store is down; at worst one
request per `retry_s` waits up to `timeout_s` on a store that does not answer (a refused connection
fails at once). Its failures meanwhile are not replayed into the store.

The `kontext_circuit_state` gauge shows the state this process acts on: the shared one, or its own
while the store is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from .. import metrics
from ..breaker import Admission, CircuitBreaker
from ..store.records import HealthRow, LatencyBatch
from .local import EWMA_WEIGHT, ProviderHealth
from .state import HealthStore

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Unavailable(Exception):
    """The store failed or did not answer (already logged)."""


class SharedProviderHealth(ProviderHealth):
    def __init__(
        self,
        failures: int,
        reset_s: float,
        store: HealthStore,
        *,
        probe_lease_s: float,
        refresh_s: float = 1.0,
        timeout_s: float = 1.0,
        retry_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # The fallback breakers leave the gauge to this class: it shows the state acted on.
        super().__init__(failures, reset_s, breaker=CircuitBreaker(failures, reset_s, clock, publish=False))
        self.store = store
        self.probe_lease_s = probe_lease_s
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.clock = clock
        self._rows: dict[str, HealthRow] = {}  # the view: the shared rows as last read
        self._offset: float | None = None  # the store's clock minus ours, at the last reading
        self._next_refresh = 0.0  # on our clock
        self._refreshing = False
        self._down = False  # the store did not answer: our own breakers decide until it does
        self._probes: dict[str, str] = {}  # key -> token of the probe lease this process holds
        self._pending: dict[str, LatencyBatch] = {}  # latency samples not written yet
        self._published: dict[str, str] = {}  # key -> state last set on the gauge

    # -- the view --

    def state(self, key: str) -> str:
        if self._down or self._offset is None:
            return self.breaker.state(key)
        row = self._rows.get(key)
        if row is None or row.opened_at is None:
            return "closed"
        return "open" if self._store_now() - row.opened_at < self.reset_s else "half_open"

    def _store_now(self) -> float:
        """The store's clock, as of the last reading plus the time our clock says has passed since."""
        return self.clock() + (self._offset or 0.0)

    async def refresh(self) -> None:
        """Write the latency samples gathered so far, then read every row: one or two round trips."""
        pending, self._pending = self._pending, {}
        try:
            if pending:
                await self._call(self.store.add_latency(pending))  # lost if this fails: our EWMA keeps them
            snapshot = await self._call(self.store.snapshot())
        except _Unavailable:
            return
        self._next_refresh = self.clock() + self.refresh_s
        if self._down:
            self._down = False
            log.info("provider health store answers again: breakers and latencies are shared again")
        self._offset = snapshot.now - self.clock()
        self._rows = snapshot.rows
        for key, row in snapshot.rows.items():
            if row.latency_s is not None:
                self._latency[key] = row.latency_s

    async def _refresh_if_due(self) -> None:
        if self._refreshing or self.clock() < self._next_refresh:
            return
        self._refreshing = True
        try:
            await self.refresh()
        finally:
            self._refreshing = False

    async def _call(self, step: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await step
        except Exception as exc:  # whatever the client raises: routing must go on without the store
            if not self._down:
                log.warning(
                    "provider health store unavailable (%s: %s): this process routes on its own breakers and "
                    "latencies until it answers; trying again every %g s",
                    type(exc).__name__,
                    str(exc)[:300],
                    self.retry_s,
                )
            self._down = True
            self._next_refresh = self.clock() + self.retry_s
            raise _Unavailable from exc

    def _seen(self, key: str, now: float, row: HealthRow) -> None:
        self._offset = now - self.clock()
        self._rows[key] = row

    def _publish(self, key: str, state: str | None = None) -> None:
        state = state or self.state(key)
        if self._published.get(key) != state:
            self._published[key] = state
            metrics.circuit(key, state)

    # -- the breaker --

    async def allow(self, key: str) -> Admission | None:
        await self._refresh_if_due()
        if self._down or self._offset is None:  # no shared view (yet): this process's own breaker
            allowed = self.breaker.allow(key)
            self._publish(key)
            return allowed
        state = self.state(key)
        self._publish(key, state)
        if state == "closed":
            return Admission.CLOSED
        row = self._rows[key]
        if state == "open" or key in self._probes or (row.probe_until or 0.0) > self._store_now():
            return None
        # Half-open by our view, no probe seen: ask the store, which judges by its own clock.
        token = uuid.uuid4().hex
        self._probes[key] = token  # while asking, this process's other requests do not ask too
        granted = False
        try:
            granted = await self._call(self.store.acquire_probe(key, self.reset_s, self.probe_lease_s, token))
        except _Unavailable:
            return self.breaker.allow(key)
        finally:
            if not granted and self._probes.get(key) == token:  # refused, failed or cancelled
                del self._probes[key]
        current = self._rows.get(key, row)
        if granted:
            self._rows[key] = replace(current, probe_until=self._store_now() + self.probe_lease_s)
            return Admission.PROBE
        # Another process probes (or the store's clock says not yet): ask again after the next refresh.
        self._rows[key] = replace(current, probe_until=math.inf)
        return None

    async def success(self, key: str) -> None:
        self.breaker.success(key)
        probe = self._probes.pop(key, None)
        row = self._rows.get(key)
        if probe is None and (row is None or (row.failures == 0 and row.opened_at is None)):
            return  # the common case: closed with no failures, nothing to tell anyone
        if not self._down:
            try:
                await self._call(self.store.success(key))
            except _Unavailable:
                pass
            else:
                self._rows[key] = HealthRow(latency_s=row.latency_s if row else None)
        self._publish(key)

    async def failure(self, key: str) -> None:
        self.breaker.failure(key)
        probe = self._probes.pop(key, None)
        if not self._down:
            try:
                reading = await self._call(self.store.failure(key, self.threshold, probe))
            except _Unavailable:
                pass
            else:
                self._seen(key, reading.now, reading.rows[key])
        self._publish(key)

    async def release(self, key: str) -> None:
        self.breaker.release(key)
        probe = self._probes.pop(key, None)
        if probe is None or self._down:
            return
        try:
            await self._call(self.store.release_probe(key, probe))
        except _Unavailable:
            return
        if (row := self._rows.get(key)) is not None:
            self._rows[key] = replace(row, probe_until=None)

    # -- latency --

    def observe(self, key: str, seconds: float) -> None:
        super().observe(key, seconds)  # this process's view reacts at once; the store gets it at the next refresh
        keep = 1 - EWMA_WEIGHT
        b = self._pending.get(key)
        if b is None:
            self._pending[key] = LatencyBatch(seconds, keep, EWMA_WEIGHT * seconds)
        else:
            self._pending[key] = LatencyBatch(
                keep * b.first + EWMA_WEIGHT * seconds, keep * b.scale, keep * b.offset + EWMA_WEIGHT * seconds
            )

    async def aclose(self) -> None:
        """Write the samples not written yet (when the store answers), then close the store's client."""
        if self._pending and not self._down:
            pending, self._pending = self._pending, {}
            with contextlib.suppress(_Unavailable):
                await self._call(self.store.add_latency(pending))
        await self.store.aclose()
