"""Shared provider health in Redis: one hash (`kontext:health` by default), a field per provider config
key holding that key's row as JSON. Every step is a Lua script, so it is atomic, and reads the time
from Redis itself (TIME): processes whose clocks differ still agree on when a breaker opened and when
a probe's lease runs out. One hash keeps every script on one Redis key (cluster-safe) and makes a
snapshot one HGETALL.
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..store.records import HealthRow, HealthSnapshot, LatencyBatch

DEFAULT_KEY = "kontext:health"

# Row fields: f failures, o opened_at, pu probe_until, pt probe_token, l latency EWMA. Lua numbers
# come back from Redis as truncated integers, so times are returned as TIME's two strings.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function load(field)
  local raw = redis.call('HGET', KEYS[1], field)
  if raw then return cjson.decode(raw) end
  return {}
end
"""

_SNAPSHOT = """
local t = redis.call('TIME')
return {t[1], t[2], redis.call('HGETALL', KEYS[1])}
"""

# ARGV: key, threshold, the probe lease's token ('' when not the probe).
_FAILURE = (
    _PRELUDE
    + """
local s = load(ARGV[1])
s.f = (s.f or 0) + 1
if s.f >= tonumber(ARGV[2]) or (ARGV[3] ~= '' and s.pt == ARGV[3]) then
  s.o = now
  s.pu = nil
  s.pt = nil
end
local raw = cjson.encode(s)
redis.call('HSET', KEYS[1], ARGV[1], raw)
return {t[1], t[2], raw}
"""
)

# ARGV: key. The latency stays: only the breaker closes.
_SUCCESS = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local s = cjson.decode(raw)
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({l = s.l}))
return 1
"""

# ARGV: key, reset_s, lease_s, token.
_ACQUIRE = (
    _PRELUDE
    + """
local s = load(ARGV[1])
if not s.o or now - s.o < tonumber(ARGV[2]) or (s.pu and s.pu > now) then return 0 end
s.pu = now + tonumber(ARGV[3])
s.pt = ARGV[4]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(s))
return 1
"""
)

# ARGV: key, token.
_RELEASE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local s = cjson.decode(raw)
if s.pt ~= ARGV[2] then return 0 end
s.pu = nil
s.pt = nil
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(s))
return 1
"""

# ARGV: (key, first, scale, offset) for each key.
_LATENCY = """
for i = 1, #ARGV, 4 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local s = {}
  if raw then s = cjson.decode(raw) end
  if s.l then
    s.l = tonumber(ARGV[i + 2]) * s.l + tonumber(ARGV[i + 3])
  else
    s.l = tonumber(ARGV[i + 1])
  end
  redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(s))
end
return 1
"""


class RedisHealthStore:
    def __init__(self, url: str, *, key: str = DEFAULT_KEY, timeout_s: float = 1.0) -> None:
        # No retries inside the client: a store that does not answer is the caller's to handle (it
        # falls back to its own state at once rather than waiting out backoffs).
        self._redis: Redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._keys = [key]
        self._snapshot = self._redis.register_script(_SNAPSHOT)
        self._failure = self._redis.register_script(_FAILURE)
        self._success = self._redis.register_script(_SUCCESS)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._release = self._redis.register_script(_RELEASE)
        self._latency = self._redis.register_script(_LATENCY)

    async def snapshot(self) -> HealthSnapshot:
        seconds, micros, flat = await self._snapshot(keys=self._keys)
        rows = {flat[i].decode(): _row(flat[i + 1]) for i in range(0, len(flat), 2)}
        return HealthSnapshot(_time(seconds, micros), rows)

    async def failure(self, key: str, threshold: int, probe: str | None) -> HealthSnapshot:
        seconds, micros, raw = await self._failure(keys=self._keys, args=[key, threshold, probe or ""])
        return HealthSnapshot(_time(seconds, micros), {key: _row(raw)})

    async def success(self, key: str) -> None:
        await self._success(keys=self._keys, args=[key])

    async def acquire_probe(self, key: str, reset_s: float, lease_s: float, token: str) -> bool:
        return bool(await self._acquire(keys=self._keys, args=[key, repr(reset_s), repr(lease_s), token]))

    async def release_probe(self, key: str, token: str) -> None:
        await self._release(keys=self._keys, args=[key, token])

    async def add_latency(self, batches: dict[str, LatencyBatch]) -> None:
        args: list[str] = []
        for key, b in batches.items():
            args += [key, repr(b.first), repr(b.scale), repr(b.offset)]
        if args:
            await self._latency(keys=self._keys, args=args)

    async def aclose(self) -> None:
        await self._redis.aclose()


def _time(seconds: Any, micros: Any) -> float:
    return int(seconds) + int(micros) / 1_000_000


def _row(raw: bytes | str) -> HealthRow:
    s = json.loads(raw)  # cjson writes whole numbers as integers
    return HealthRow(
        failures=int(s.get("f", 0)),
        opened_at=_float(s.get("o")),
        probe_until=_float(s.get("pu")),
        latency_s=_float(s.get("l")),
    )


def _float(value: float | int | None) -> float | None:
    return None if value is None else float(value)
