"""Provider health in one process: a circuit breaker per (provider, model) config key and an EWMA of
each route's successful durations. Every process learns on its own (the default).

The Router awaits allow/success/failure/release because a shared implementation (shared.py) may
talk to its store; here they never suspend, so a request pays a few dictionary operations.
"""

from __future__ import annotations

from ..breaker import Admission, CircuitBreaker

EWMA_WEIGHT = 0.2  # of a new latency sample against the running average


class ProviderHealth:
    def __init__(self, failures: int, reset_s: float, *, breaker: CircuitBreaker | None = None) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        # This process's own breakers: the ones that decide here (a shared health falls back on them).
        self.breaker = breaker or CircuitBreaker(failures, reset_s)
        self._latency: dict[str, float] = {}  # config key -> EWMA of successful durations, seconds

    def state(self, key: str) -> str:
        """closed, open or half_open."""
        return self.breaker.state(key)

    async def allow(self, key: str) -> Admission | None:
        """How a request may go to `key` now, or None (in half-open state, only one probe at a time)."""
        return self.breaker.allow(key)

    async def success(self, key: str) -> None:
        self.breaker.success(key)

    async def failure(self, key: str) -> None:
        self.breaker.failure(key)

    async def release(self, key: str) -> None:
        """The probe (a request let through as Admission.PROBE) ended with no verdict on the provider
        (moderation, a request error, a cancel): given up, for another to take. Only the probe calls
        it: a request let through while closed has nothing to give back."""
        self.breaker.release(key)

    def latency(self, key: str) -> float | None:
        """The EWMA of `key`'s successful durations in seconds; None before the first."""
        return self._latency.get(key)

    def observe(self, key: str, seconds: float) -> None:
        old = self._latency.get(key)
        self._latency[key] = seconds if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * seconds

    async def aclose(self) -> None:
        """Nothing to close here; a shared health closes its store."""
