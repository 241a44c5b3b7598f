"""Prometheus metrics: every series the gateway exports, and one small helper per thing observed.

Other modules call the helpers (`metrics.provider_attempt(...)`, `metrics.cost(...)`) rather than
the metric objects, so label names and values stay consistent in one place. Labels never carry keys,
prompts or URLs: only route templates, catalog model ids, provider names, statuses and classes.

Several processes (`kontext serve --workers 0` plus `kontext worker`s, or several API processes):
set `PROMETHEUS_MULTIPROC_DIR` to an empty directory shared by all of them (emptied before they
start). prometheus_client then keeps values in memory-mapped files there and `render()` merges
them into one view. It must be set before this module is first imported (in the environment).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# HTTP: from 5 ms (a GET of a prediction) to minutes (a synchronous generation).
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# One upstream task or local run: images take seconds to minutes.
_PROVIDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120)
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

REQUESTS = Counter(
    "kontext_requests_total",
    "HTTP requests answered, by route template, model and status.",
    ["route", "model", "status"],
)
REQUEST_DURATION = Histogram(
    "kontext_request_duration_seconds",
    "HTTP request duration, by route template and model.",
    ["route", "model"],
    buckets=_HTTP_BUCKETS,
)
PROVIDER_DURATION = Histogram(
    "kontext_provider_request_duration_seconds",
    "One upstream task or local run, by provider, model and outcome (succeeded, failed).",
    ["provider", "model", "outcome"],
    buckets=_PROVIDER_BUCKETS,
)
PROVIDER_ERRORS = Counter(
    "kontext_provider_errors_total", "Failed or skipped provider attempts, by error class.", ["provider", "error_class"]
)
# Each process sets the state it acts on (its own breakers, or its view of shared ones): across
# processes, the worst state any live process has.
CIRCUIT_STATE = Gauge(
    "kontext_circuit_state",
    "Circuit breaker per provider config key: 0 closed, 1 half-open, 2 open.",
    ["provider"],
    multiprocess_mode="livemax",
)
# Computed from the database when /metrics is scraped: the same for every process, so the latest wins.
QUEUE_DEPTH = Gauge(
    "kontext_queue_depth", "Jobs waiting for a worker (status starting).", multiprocess_mode="livemostrecent"
)
QUEUE_WAIT = Histogram(
    "kontext_queue_wait_seconds", "Time from a job's creation to its first claim by a worker.", buckets=_QUEUE_BUCKETS
)
COST = Counter(
    "kontext_cost_usd_total", "Settled cost of succeeded jobs in USD, by model and provider.", ["model", "provider"]
)
WEBHOOKS = Counter(
    "kontext_webhook_deliveries_total",
    "Webhook delivery attempts, by event and outcome (delivered, retry, failed, dropped).",
    ["event", "outcome"],
)
RATE_LIMITED = Counter("kontext_rate_limited_total", "Requests refused by a rate limit, by limit.", ["limit"])
BUDGET_REJECTIONS = Counter("kontext_budget_rejections_total", "Requests refused because a budget was spent.")
# Per process (a pid label across processes): set once, when the process has started serving.
GC_FROZEN = Gauge(
    "kontext_gc_frozen_objects",
    "Objects of the start-up heap set aside from the garbage collector (gc.freeze) once serving began.",
    multiprocess_mode="liveall",
)

_CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


_request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def request(route: str, model: str, status: int, seconds: float) -> None:
    """One HTTP request answered (called by api/middleware.MetricsMiddleware). The labelled series
    are looked up once per label set: `labels()` costs a few µs, on every request."""
    series = _request_series.get((route, model, status))
    if series is None:
        series = _request_series[(route, model, status)] = (
            REQUESTS.labels(route, model, str(status)),
            REQUEST_DURATION.labels(route, model),
        )
    series[0].inc()
    series[1].observe(seconds)


def provider_attempt(provider: str, model: str, outcome: str, seconds: float, error_class: str | None = None) -> None:
    """One provider attempt (an upstream task or a local run). Skipped attempts (an open circuit)
    count as errors but take no time, so they stay out of the duration histogram."""
    if outcome != "skipped":
        PROVIDER_DURATION.labels(provider, model, outcome).observe(seconds)
    if outcome != "succeeded":
        PROVIDER_ERRORS.labels(provider, error_class or "error").inc()


def circuit(key: str, state: str) -> None:
    """A breaker (config key, e.g. `fal/flux.1-kontext-pro`) is now closed, half_open or open."""
    CIRCUIT_STATE.labels(key).set(_CIRCUIT_VALUES[state])


def queue_depth(waiting: int) -> None:
    QUEUE_DEPTH.set(waiting)


def queue_wait(seconds: float) -> None:
    QUEUE_WAIT.observe(max(0.0, seconds))


def cost(model: str, provider: str, usd: float) -> None:
    """Money settled for a job, in USD: call once, where the cost is final (never for estimates)."""
    if usd > 0:
        COST.labels(model, provider).inc(usd)


def webhook_delivery(event: str, outcome: str) -> None:
    WEBHOOKS.labels(event, outcome).inc()


def rate_limited(limit: str) -> None:
    """A request refused by the rate limit named `limit` (a kind such as "requests_per_minute",
    never a key)."""
    RATE_LIMITED.labels(limit).inc()


def budget_rejected() -> None:
    BUDGET_REJECTIONS.inc()


def gc_frozen(objects: int) -> None:
    GC_FROZEN.set(objects)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render() -> tuple[bytes, str]:
    """(body, content type) of the text exposition: this process's registry, or, in multiprocess
    mode, a fresh registry merging every process's files (the default one would count twice)."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exit() -> None:
    """This process is stopping: drop its live gauges (circuit states, queue depth) from the merged
    view. A process killed without this leaves its last values until the directory is emptied."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(os.getpid())
