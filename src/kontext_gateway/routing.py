"""Provider choice and failover: ordered attempts over the providers that can serve a job.

Candidates are the model's routes (provider entries) that do the mode, are configured (credentials,
weights) and can take the job (number of input images...). A forced provider (a config key such as
`replicate/flux.1-kontext-pro` as the model, or the `x-provider` header) allows only that one.
Order: `provider_priority` (lower first), then price per image, then observed latency, with
`provider_weights` sharing load between otherwise equal providers. A circuit breaker per
(provider, model) skips providers that keep failing and probes them back in. Breakers and latencies
are the `ProviderHealth` given (provider_health/): this process's own, or shared by every process.

When no route can serve, the error names every route and why (edits only, no key, no weights, too
many images...), and its status says who must act:
- 400 `unsupported_mode`: no route of the model does the mode at all, configured or not;
- 400 `unsupported_by_providers`: the request asks what no route could do even once configured, or
  what the configured ones cannot (the request must change);
- 503 `provider_unavailable`: a route would serve it once configured (the operator must act).
A dry run prices the routes that would serve once configured (`prospective`), without keys.

Failover: transient failures are retried inside the provider (see providers/hosted.py); what is
left moves on to the next candidate. Moderation ends the request at once (400
`content_policy_violation`). When every candidate failed: 502 `all_providers_exhausted`, listing each
attempt.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from . import metrics
from .breaker import Admission
from .catalog import Mode, ModelSpec, ProviderEntry
from .config import Settings
from .errors import GatewayError, unavailable
from .pixel_budget import budget, over_budget
from .provider_health.local import ProviderHealth
from .providers.base import Attempt, ImageJob, Provider, ProviderResult, Refusal
from .providers.errors import Moderated, RateLimited, UpstreamError
from .timing import ms_since

Candidate = tuple[ProviderEntry, Provider]
_MODE_ONLY = {"edit": "edits", "text-to-image": "text-to-image"}


@dataclass(frozen=True)
class RouteCheck:
    """One route of a model judged for one request: why it cannot do the mode at all, why it is not
    configured, why it cannot take this request even configured (each None when it is not so)."""

    entry: ProviderEntry
    impl: Provider | None
    mode_reason: str | None = None
    config_reason: str | None = None
    refusal: Refusal | None = None

    @property
    def usable(self) -> bool:
        return self.mode_reason is None and self.config_reason is None and self.refusal is None

    @property
    def reason(self) -> str:
        """Why it cannot serve this request ("" when it can)."""
        if self.mode_reason:
            return self.mode_reason
        if self.refusal and self.config_reason:
            return f"{self.refusal.reason} (and {self.config_reason})"
        return self.refusal.reason if self.refusal else self.config_reason or ""


class Router:
    def __init__(
        self, providers: dict[str, Provider], settings: Settings | None = None, health: ProviderHealth | None = None
    ) -> None:
        self.providers = providers
        self.settings = settings or Settings()
        # Breakers per config key and the EWMA of successful durations; this process's own by default.
        self.health = health or ProviderHealth(self.settings.breaker_failures, self.settings.breaker_reset_s)

    def handlings(self, model: ModelSpec) -> dict[str, dict[str, dict[str, str]]]:
        """config_key -> parameter handling, for every provider implementation the gateway has."""
        return {
            e.config_key: self.providers[e.provider].handling(e)
            for e in model.providers
            if e.provider in self.providers
        }

    def pixel_budgets(self, model: ModelSpec) -> dict[str, int]:
        """config_key -> output pixels (n x width x height) one request may ask of it."""
        return {e.config_key: budget(self.settings, e) for e in model.providers if e.provider in self.providers}

    def candidates(
        self,
        model: ModelSpec,
        mode: Mode,
        job: ImageJob,
        *,
        forced: ProviderEntry | None = None,
        provider: str | None = None,
        prospective: bool = False,
    ) -> list[Candidate]:
        """The entries that can serve the job now, in order. Raises a clear error when none can.
        `prospective` (a dry run): when none is configured, those that would serve once configured."""
        # The configured routes first: judging a request (building its body) for the others only
        # matters when none of those serves it, to say why.
        checks = self.routes(model, mode, job, forced=forced, provider=provider, configured_only=True)
        usable = [(c.entry, c.impl) for c in checks if c.impl is not None and c.usable]
        if usable:
            return self._order(usable, model)
        checks = self.routes(model, mode, job, forced=forced, provider=provider)
        capable = [c for c in checks if c.mode_reason is None]
        would_serve = [(c.entry, c.impl) for c in capable if c.impl is not None and c.refusal is None]
        if prospective and would_serve:
            return self._order(would_serve, model)
        why = "; ".join(f"{c.entry.config_key}: {c.reason}" for c in checks)
        if not capable:
            raise GatewayError(
                f"Model '{model.id}' has no route here that does {_mode_words(mode)}: {why}.",
                param="model",
                code="unsupported_mode",
            )
        if not would_serve or any(c.refusal and c.config_reason is None for c in capable):
            # The request asks for something no route (or no configured route) does: it must change (400),
            # naming the parameter when one is why they refuse.
            params = {c.refusal.param for c in capable if c.refusal is not None}
            raise GatewayError(
                f"No provider of model '{model.id}' can do what this request asks: {why}.",
                param=params.pop() if len(params) == 1 else None,
                code="unsupported_by_providers",
            )
        raise unavailable(f"No provider can serve model '{model.id}' ({mode}) right now: {why}.")

    def routes(
        self,
        model: ModelSpec,
        mode: Mode,
        job: ImageJob,
        *,
        forced: ProviderEntry | None = None,
        provider: str | None = None,
        configured_only: bool = False,
    ) -> list[RouteCheck]:
        """Every route of the model (only the forced one, or the `x-provider` ones) judged for this job
        (`configured_only`: whether each would take it is judged for the configured routes only)."""
        entries = list(model.providers)
        if forced is not None:
            # By key: the forced entry is one of the model's own, and pydantic's == compares every field.
            if forced.config_key not in {e.config_key for e in model.providers_for(mode)}:
                raise GatewayError(
                    f"Provider '{forced.config_key}' does not support {mode} for model '{model.id}'.",
                    param="model",
                    code="unsupported_mode",
                )
            entries = [forced]
        if provider:
            entries = [e for e in entries if provider.lower() in (e.provider, e.config_key)]
            if not entries:
                known = ", ".join(sorted({e.provider for e in model.providers_for(mode)})) or "none"
                raise GatewayError(
                    f"Provider '{provider}' does not serve model '{model.id}' for {mode}. Providers: {known}.",
                    param="x-provider",
                    code="provider_not_found",
                )
        return [self._check(entry, mode, job, configured_only) for entry in entries]

    def _check(self, entry: ProviderEntry, mode: Mode, job: ImageJob, configured_only: bool) -> RouteCheck:
        impl = self.providers.get(entry.provider)
        if entry.modes is not None and mode not in entry.modes:
            return RouteCheck(entry, impl, mode_reason=" and ".join(_MODE_ONLY[m] for m in entry.modes) + " only")
        if impl is None:
            return RouteCheck(entry, None, mode_reason=f"the gateway has no {entry.provider} adapter")
        config_reason = None if impl.available(entry) else impl.unavailable_reason(entry)
        if config_reason is not None and configured_only:
            return RouteCheck(entry, impl, config_reason=config_reason)
        refusal = over_budget(self.settings, entry, job) or impl.unsupported(entry, job)
        return RouteCheck(entry, impl, config_reason=config_reason, refusal=refusal)

    def _order(self, usable: list[Candidate], model: ModelSpec) -> list[Candidate]:
        if len(usable) < 2:  # the common case: one configured route, nothing to weigh
            return usable
        prio, weights = self.settings.provider_priority, self.settings.provider_weights

        def key(c: Candidate) -> tuple[Any, ...]:
            entry = c[0]
            priority = prio.get(entry.config_key, prio.get(entry.provider, 0))
            weight = weights.get(entry.config_key, weights.get(entry.provider, 1.0))
            # Weighted random tie-break (Efraimidis-Spirakis keys): higher weight, earlier on average.
            tie = -(random.random() ** (1.0 / weight)) if weight > 0 else 0.0
            latency = self.health.latency(entry.config_key) or 0.0
            return (priority, entry.pricing.price_per_image(), round(latency, 1), tie)

        return sorted(usable, key=key)

    def observe(self, config_key: str, seconds: float) -> None:
        self.health.observe(config_key, seconds)

    async def run(self, candidates: list[Candidate], job: ImageJob) -> tuple[ProviderEntry, ProviderResult]:
        seen = len(job.attempts)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                return await self._run(candidates, job)
        except TimeoutError:
            raise GatewayError(
                f"No provider finished within {self.settings.request_timeout_s:g} s. " + _summary(job.attempts),
                status=504,
                type="server_error",
                code="request_timeout",
            ) from None
        finally:
            # One place for the provider metrics: every attempt this run made, whichever way it ended.
            for a in job.attempts[seen:]:
                metrics.provider_attempt(a.provider, job.model.id, a.outcome, a.duration_ms / 1000, a.error_class)

    async def _run(self, candidates: list[Candidate], job: ImageJob) -> tuple[ProviderEntry, ProviderResult]:
        last: Exception | None = None
        retry_after: list[float] = []
        for entry, impl in candidates:
            breaker_key = entry.config_key  # one breaker per (provider, model)
            admission = await self.health.allow(breaker_key)
            # Only a half-open breaker's probe has something to give back when it ends without a
            # verdict: a request let through while closed must not free the probe another one holds.
            probe = admission is Admission.PROBE
            if admission is None and len(candidates) > 1:
                job.attempts.append(
                    Attempt(
                        impl.name,
                        entry.config_key,
                        "skipped",
                        0,
                        error_class="circuit_open",
                        message="circuit breaker open after repeated failures",
                    )
                )
                continue
            t0, seen = time.perf_counter(), len(job.attempts)
            try:
                result = await impl.generate(entry, job)
            except UpstreamError as exc:
                _record(job, seen, entry, impl, t0, error=exc)
                if isinstance(exc, Moderated):
                    if probe:
                        await self.health.release(breaker_key)
                    raise GatewayError(
                        f"The request was rejected by {entry.provider}'s content moderation: {exc.message}",
                        status=400,
                        code="content_policy_violation",
                        param="prompt",
                    ) from None
                if exc.kind == "invalid_request":  # the request, not the provider's health
                    if probe:
                        await self.health.release(breaker_key)
                else:
                    await self.health.failure(breaker_key)
                if isinstance(exc, RateLimited) and exc.retry_after is not None:
                    retry_after.append(exc.retry_after)
                last = exc
                continue
            except GatewayError as exc:  # the local engine
                _record(job, seen, entry, impl, t0, error=exc)
                if exc.status < 500:
                    if probe:
                        await self.health.release(breaker_key)
                    raise
                await self.health.failure(breaker_key)
                last = exc
                continue
            except BaseException:
                # Cancelled (the request's deadline, its client gone) or a bug: no verdict on the
                # provider, but a probe this request is must not stay taken.
                if probe:
                    await self.health.release(breaker_key)
                raise
            _record(job, seen, entry, impl, t0, images=len(result.images))
            await self.health.success(breaker_key)
            self.observe(entry.config_key, time.perf_counter() - t0)
            return entry, result
        headers = {"x-should-retry": "true"}
        if retry_after:
            headers["retry-after"] = str(max(1, int(min(retry_after) + 0.999)))
        if len(candidates) == 1 and last is not None and isinstance(last, GatewayError):
            last.headers.update(headers)
            raise last
        raise GatewayError(
            f"All providers failed for model '{job.model.id}'. " + _summary(job.attempts),
            status=502,
            type="server_error",
            code="all_providers_exhausted",
            headers=headers,
        )


def _record(
    job: ImageJob,
    seen: int,
    entry: ProviderEntry,
    impl: Provider,
    t0: float,
    *,
    images: int = 0,
    error: UpstreamError | GatewayError | None = None,
) -> None:
    """Every provider run shows in the attempts: hosted providers record one per upstream task as they
    go; a run that recorded none (the local engine, a failure before any task) gets one here."""
    if len(job.attempts) > seen:
        return
    if error is None:
        job.attempts.append(Attempt(impl.name, entry.config_key, "succeeded", ms_since(t0), images=images))
        return
    kind, status = (error.kind, error.status) if isinstance(error, UpstreamError) else (error.code or "error", None)
    job.attempts.append(
        Attempt(
            impl.name,
            entry.config_key,
            "failed",
            ms_since(t0),
            error_class=kind,
            status_code=status,
            message=error.message[:300],
        )
    )


def _summary(attempts: list[Attempt]) -> str:
    if not attempts:
        return "No attempt was made."
    parts = []
    for i, a in enumerate(attempts, 1):
        what = a.error_class or a.outcome
        status = f" {a.status_code}" if a.status_code else ""
        msg = f": {a.message}" if a.message else ""
        parts.append(f"{i}. {a.config_key} {a.outcome} ({what}{status}){msg}")
    return "Attempts: " + " | ".join(parts)


def _mode_words(mode: Mode) -> str:
    return "image editing" if mode == "edit" else "text-to-image generation"
