"""Provider choice and failover: ordered attempts over the providers that can serve a job.

The order is the catalog's (cheapest first once prices differ); a forced provider (a config key such
as `replicate/flux.1-kontext-pro` as the model, or the `x-provider` header) allows only that one. A
failure that another provider might not have (5xx, timeouts, engine errors) moves on to the next;
a failure of the request itself (4xx) ends the attempt list at once. Every attempt is recorded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from .catalog import Mode, ModelSpec, ProviderEntry
from .errors import GatewayError, unavailable
from .providers.base import ImageJob, Provider, ProviderResult


@dataclass
class Attempt:
    provider: str
    config_key: str
    status: str  # "succeeded" | "failed"
    duration_ms: int
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Router:
    def __init__(self, providers: dict[str, Provider]) -> None:
        self.providers = providers

    def handlings(self, model: ModelSpec) -> dict[str, dict[str, dict[str, str]]]:
        """config_key -> parameter handling, for every provider implementation the gateway has."""
        return {
            e.config_key: self.providers[e.provider].handling()
            for e in model.providers
            if e.provider in self.providers
        }

    def candidates(
        self, model: ModelSpec, mode: Mode, *, forced: ProviderEntry | None = None, provider: str | None = None
    ) -> list[tuple[ProviderEntry, Provider]]:
        """The entries that can serve (model, mode) now, in order. Raises a clear error when none can."""
        entries = model.providers_for(mode)
        if forced is not None:
            if forced not in entries:
                raise GatewayError(
                    f"Provider '{forced.config_key}' does not support {mode} for model '{model.id}'.",
                    param="model", code="unsupported_mode",
                )
            entries = [forced]
        if provider:
            entries = [e for e in entries if provider.lower() in (e.provider, e.config_key)]
            if not entries:
                known = ", ".join(sorted({e.provider for e in model.providers_for(mode)})) or "none"
                raise GatewayError(
                    f"Provider '{provider}' does not serve model '{model.id}' for {mode}. Providers: {known}.",
                    param="x-provider", code="provider_not_found",
                )
        usable: list[tuple[ProviderEntry, Provider]] = []
        reasons: list[str] = []
        for entry in entries:
            impl = self.providers.get(entry.provider)
            if impl is None:
                reasons.append(f"{entry.config_key}: the {entry.provider} adapter is not part of this gateway yet")
            elif not impl.available(entry):
                reasons.append(f"{entry.config_key}: {impl.unavailable_reason(entry)}")
            else:
                usable.append((entry, impl))
        if not usable:
            raise unavailable(
                f"No provider can serve model '{model.id}' ({mode}) right now. " + "; ".join(reasons) + "."
            )
        return usable

    async def run(
        self, candidates: list[tuple[ProviderEntry, Provider]], job: ImageJob
    ) -> tuple[ProviderEntry, ProviderResult, list[Attempt]]:
        attempts: list[Attempt] = []
        last: GatewayError | None = None
        for entry, impl in candidates:
            t0 = time.perf_counter()
            try:
                result = await impl.generate(entry, job)
            except GatewayError as exc:
                attempts.append(Attempt(impl.name, entry.config_key, "failed", _ms(t0), exc.body()["error"]))
                if exc.status < 500:  # the request itself is wrong: no other provider will do better
                    exc.attempts = attempts
                    raise
                last = exc
                continue
            attempts.append(Attempt(impl.name, entry.config_key, "succeeded", _ms(t0)))
            return entry, result, attempts
        assert last is not None
        if len(candidates) > 1:
            last = GatewayError(
                f"All {len(candidates)} providers failed; the last said: {last.message}",
                status=502, type="server_error", code="all_providers_failed",
            )
        last.attempts = attempts
        raise last


def _ms(t0: float) -> int:
    return int((time.perf_counter() - t0) * 1000)
