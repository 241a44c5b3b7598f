"""What a shared health store does: each step atomic, judged by the store's own clock (Redis TIME,
PostgreSQL now()), so processes whose clocks differ agree on when a breaker opened and when a probe's
lease runs out. Implemented by redis_store.RedisHealthStore and store.provider_health.PostgresHealthStore.
"""

from __future__ import annotations

from typing import Protocol

from ..store.records import HealthSnapshot, LatencyBatch


class HealthStore(Protocol):
    async def snapshot(self) -> HealthSnapshot:
        """Every key's row, and the store's clock."""
        ...

    async def failure(self, key: str, threshold: int, probe: str | None) -> HealthSnapshot:
        """Count a failure: the breaker (re)opens, its probe lease dropped, when the consecutive
        failures reach `threshold` or when the failure is the probe's (`probe`, the lease's token).
        Returns the key's row after it."""
        ...

    async def success(self, key: str) -> None:
        """Close the breaker: failures to 0, no opening, no probe."""
        ...

    async def acquire_probe(self, key: str, reset_s: float, lease_s: float, token: str) -> bool:
        """Take the half-open probe: only when the breaker opened `reset_s` ago or more and no probe
        lease runs; the lease then runs `lease_s`, under `token`. Whether it was taken."""
        ...

    async def release_probe(self, key: str, token: str) -> None:
        """Give the probe lease up, when `token` still holds it."""
        ...

    async def add_latency(self, batches: dict[str, LatencyBatch]) -> None:
        """Fold each key's batch of samples into its shared EWMA."""
        ...

    async def aclose(self) -> None: ...
