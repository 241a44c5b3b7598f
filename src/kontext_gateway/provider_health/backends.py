"""The provider health the settings ask for: this process's own ("memory", the default), or shared
through Redis or PostgreSQL (`provider_health_url`), as the rate limits are (`rate_limit_url`)."""

from __future__ import annotations

from ..config import POSTGRES_SCHEMES, SHARED_STATE_URLS, Settings
from ..store.provider_health import PostgresHealthStore
from .local import ProviderHealth
from .redis_store import RedisHealthStore
from .shared import SharedProviderHealth
from .state import HealthStore


def open_health_store(url: str | None) -> HealthStore | None:
    """The shared store `url` names (clients connect on first use); None for "memory"."""
    if url is None or url == "memory":
        return None
    if url.startswith("redis://"):
        return RedisHealthStore(url)
    if url.startswith(POSTGRES_SCHEMES):
        return PostgresHealthStore(url)
    raise ValueError(f"unsupported provider health URL {url!r}: use {SHARED_STATE_URLS}")


def open_provider_health(settings: Settings) -> ProviderHealth:
    store = open_health_store(settings.provider_health_url)
    if store is None:
        return ProviderHealth(settings.breaker_failures, settings.breaker_reset_s)
    # A probe that has not ended within one upstream task's timeout is presumed gone with its process.
    return SharedProviderHealth(
        settings.breaker_failures, settings.breaker_reset_s, store, probe_lease_s=settings.upstream_timeout_s
    )
