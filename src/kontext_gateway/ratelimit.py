"""Per-key rate limits ("requests per minute", "images per minute") on pyrate-limiter 4.5.

One `RateLimiter` serves every API key: `hit(name, limit, weight)` spends `weight` units of
`name`'s allowance of `limit` per minute and says whether that was admitted and, if not, how
long until it would be. The storage decides who shares the allowance:

* ``None`` / ``"memory"``: this process only. GCRA state (one timestamp per key) in memory.
* ``"redis://host:port/db"``: every process on that Redis. The same GCRA, applied atomically
  by pyrate's Lua script, so concurrent gateways never over-admit. The script reads the time from
  Redis itself (`ServerTimeRedisStore`): hits stamped by the callers' clocks could reach Redis out
  of order (or from hosts whose clocks differ), and GCRA then refuses a hit it should admit.
* ``"postgresql://..."``: every process on that database. pyrate's PostgresBucket keeps a
  sliding-window log per key in its own table; it is synchronous (psycopg3), so it runs in a
  worker thread to keep the event loop free.

We call the buckets directly rather than through pyrate's `Limiter`: we want a verdict plus a
retry-after to put in a 429, never to block or sleep inside the limiter.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from dataclasses import dataclass
from inspect import isawaitable
from typing import Any

from pyrate_limiter import (
    GCRA,
    Duration,
    InMemoryStateStore,
    PostgresBucket,
    Rate,
    RateItem,
    RedisStateStore,
    StateBucket,
)

from .config import POSTGRES_SCHEMES, SHARED_STATE_URLS

REDIS_PREFIX = "kontext:rl:"
_MINUTE_MS = Duration.MINUTE.value
# PostgresBucket only removes expired log rows when leaked; without pyrate's Limiter (whose
# background Leaker would do it) we leak each table ourselves, at most this often.
_PG_LEAK_EVERY_S = 60.0
# PostgresBucket locks its table with NOWAIT and reports a busy lock as a plain denial (no
# retry-after). That is contention, not a spent allowance, so we retry briefly before giving up.
_PG_BUSY_RETRIES = 10


class ServerTimeRedisStore(RedisStateStore):
    """pyrate's Redis store, with its script's `now` taken from Redis's TIME inside the same atomic
    step: every hit is judged at the moment Redis applies it, in the order it applies them."""

    _NOW = (
        "local server = redis.call('TIME')\n"
        # ARGV[1] is the caller's time in ms: replaced by Redis's own, to the microsecond.
        "ARGV[1] = tonumber(server[1]) * 1000 + tonumber(server[2]) / 1000\n"
    )

    def _script(self, algorithm: Any) -> Any:
        lua = self._NOW + algorithm.redis_script()
        script = self._scripts.get(lua)
        if script is None:
            script = self._scripts[lua] = self.redis.register_script(lua)
        return script


@dataclass(frozen=True)
class Admission:
    allowed: bool
    retry_after_s: float | None = None  # when denied: seconds until this weight would be admitted; None if it never can


@dataclass
class _Entry:
    limit: int
    bucket: Any
    lock: threading.Lock  # PostgresBucket.put_decision reads back per-bucket fields: one thread at a time
    leaked_at: float = 0.0


class RateLimiter:
    def __init__(self, url: str | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        self._entries_lock = threading.Lock()  # PostgreSQL buckets are made in worker threads
        self._redis: Any = None
        self._pool: Any = None
        if url is None or url == "memory":
            self._kind = "memory"
        elif url.startswith("redis://"):
            from redis.asyncio import Redis

            self._kind = "redis"
            self._redis = Redis.from_url(url)
        elif url.startswith(POSTGRES_SCHEMES):
            from psycopg_pool import ConnectionPool

            self._kind = "postgres"
            # psycopg (libpq) takes only the plain scheme; SQLAlchemy-style driver suffixes go.
            conninfo = "postgresql://" + url.split("://", 1)[1]
            # open=True starts background workers that connect; it does not block here.
            self._pool = ConnectionPool(conninfo, min_size=1, max_size=4, timeout=10, open=True)
        else:
            raise ValueError(f"unsupported rate-limit storage URL {url!r}: use {SHARED_STATE_URLS}")

    def _bucket(self, name: str, limit: int) -> _Entry:
        """The cached bucket for (name, limit). A changed limit replaces the bucket; the stored
        state is keyed by name alone, so what was already spent carries over to the new limit."""
        with self._entries_lock:
            entry = self._entries.get(name)
            if entry is None or entry.limit != limit:
                entry = self._entries[name] = _Entry(limit, self._new_bucket(name, limit), threading.Lock())
            return entry

    def _new_bucket(self, name: str, limit: int) -> Any:
        # burst == limit: a key at rest may spend its whole minute at once, then refills smoothly.
        rates = [Rate(limit, _MINUTE_MS)]
        if self._kind == "memory":
            return StateBucket(rates, GCRA(), InMemoryStateStore())
        if self._kind == "redis":
            # Redis keys are binary-safe, so the name is used verbatim (readable in redis-cli).
            return StateBucket(rates, GCRA(), ServerTimeRedisStore(self._redis, REDIS_PREFIX + name))
        # Table names must be short identifiers (pyrate adds "ratelimit___" and an index name
        # "timestampindex_..." within PostgreSQL's 63 bytes): a hash of the name does that.
        table = "kx_" + hashlib.sha256(name.encode()).hexdigest()[:24]
        return PostgresBucket(self._pool, table, rates)  # creates its table: called in a thread

    async def hit(self, name: str, limit_per_minute: int, weight: int = 1) -> Admission:
        """Spend `weight` units of `name`'s allowance of `limit_per_minute`; denials spend nothing."""
        if limit_per_minute < 1 or weight < 0:
            raise ValueError("limit_per_minute must be >= 1 and weight >= 0")
        if weight > limit_per_minute:
            return Admission(False, None)  # larger than the whole allowance: never admissible
        if self._kind == "postgres":
            for attempt in range(_PG_BUSY_RETRIES):
                retry_ms = await asyncio.to_thread(self._pg_hit, name, limit_per_minute, weight)
                if retry_ms != -1:
                    return Admission(True) if retry_ms is None else Admission(False, retry_ms / 1000)
                await asyncio.sleep(0.01 * (attempt + 1))
            return Admission(False, 1.0)  # persistently busy: ask the client to come back soon
        entry = self._bucket(name, limit_per_minute)
        # StateBucket stamps nothing itself: the item carries the clock's time
        # (monotonic in memory, wall clock for the shared Redis state).
        decision = entry.bucket.put_decision(RateItem(name, entry.bucket.now(), weight))
        if isawaitable(decision):
            decision = await decision
        if decision.allowed:
            return Admission(True)
        # GCRA computes the wait in the same atomic step (Lua for Redis); with weight <= burst
        # it is always set.
        retry_ms = decision.retry_after_ms
        return Admission(False, None if retry_ms is None else retry_ms / 1000)

    def _pg_hit(self, name: str, limit: int, weight: int) -> int | None:
        """Blocking PostgreSQL hit: None when admitted, else the retry-after in ms (-1: table busy)."""
        entry = self._bucket(name, limit)
        with entry.lock:
            bucket = entry.bucket
            now_ms = bucket.now()  # the database's clock, shared by every process
            if time.monotonic() - entry.leaked_at > _PG_LEAK_EVERY_S:
                bucket.leak(now_ms)
                entry.leaked_at = time.monotonic()
            decision = bucket.put_decision(RateItem(name, now_ms, weight))
        if decision.allowed:
            return None
        return -1 if decision.retry_after_ms is None else decision.retry_after_ms

    async def aclose(self) -> None:
        # Buckets are not closed one by one: PostgresBucket.close() would close the shared pool.
        self._entries.clear()
        if self._redis is not None:
            await self._redis.aclose()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.close)
