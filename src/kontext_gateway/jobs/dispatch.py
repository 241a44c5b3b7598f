"""Sends queued webhook deliveries: signed (Standard Webhooks), at most one in flight per prediction.

Each is signed with the secret of the API key that made its prediction (the claimed row carries the
request's `key_id`; None: the gateway's own secret), so one key's receiver never accepts what was
signed for another key.

Deliveries are rows (`webhook_deliveries`), so they outlive the process that queued them: any
process running workers claims the due ones, and a sender that died mid-send leaves a lease that
runs out. The database hands out only a prediction's oldest open delivery (Database.claim_delivery),
so events arrive in order and never overlap. Only the terminal event (`completed`) is retried, with
exponential backoff and jitter over hours; the others are sent once (as Replicate does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from .. import __version__, metrics
from ..config import Settings
from ..errors import GatewayError
from ..net import PinnedTransport
from ..store.db import Database
from ..store.records import DeliveryRow
from ..timing import retry_after_s

log = logging.getLogger(__name__)

TERMINAL_EVENT = "completed"
MAX_RETRY_AFTER_S = 24 * 3600.0  # a receiver's Retry-After is honoured up to this


class Signer(Protocol):
    """A webhook secret: signs one message (Standard Webhooks' `webhook-signature` value)."""

    def sign(self, msg_id: str, at: datetime, body: str) -> str: ...


@dataclass
class Outcome:
    state: str  # delivered | retry | failed | dropped
    status: int | None = None  # the receiver's HTTP status, when it answered
    error: str | None = None
    retry_after: float | None = None
    gone: bool = False  # 410: drop the prediction's other deliveries too


class WebhookDispatcher:
    def __init__(self, db: Database, settings: Settings, secret: Callable[[str | None], Signer]) -> None:
        # `secret(key_id)`: the secret that signs a prediction's deliveries (None: made without a key).
        self.db = db
        self.settings = settings
        self._secret = secret
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[Any] | None = None
        self._sending: set[asyncio.Task[Any]] = set()
        self._client: httpx.AsyncClient | None = None

    def wake(self) -> None:
        """A delivery was queued (or one finished, freeing its prediction's next): look now."""
        self._wake.set()

    async def start(self) -> None:
        if self._loop_task is not None:
            return
        self._secret(None)  # load (or create) the gateway's secret now: a bad configured one fails at startup
        # No redirects: a 3xx is a failed delivery, never a hop to an address nobody checked. Each
        # connection resolves the receiver's name once and goes to the address it checked (net.py).
        transport = PinnedTransport(allow_private=self.settings.allow_private_urls, param="webhook", status=422)
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=self.settings.webhook_timeout_s,
            follow_redirects=False,
            headers={"user-agent": f"kontext-gateway/{__version__} (webhooks)"},
        )
        self._loop_task = asyncio.create_task(self._loop(), name="webhooks")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._sending) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loop_task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _loop(self) -> None:
        slots = asyncio.Semaphore(self.settings.webhook_concurrency)
        lease_s = self.settings.webhook_timeout_s + 30.0  # outlives one send, timeout included
        while True:
            await slots.acquire()
            row = None
            while row is None:
                self._wake.clear()  # before the claim: a wake-up during it is not lost
                try:
                    row = await self.db.claim_delivery(lease_s)
                except Exception:
                    log.exception("claiming a webhook delivery failed")
                if row is None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.settings.webhook_poll_interval_s):
                            await self._wake.wait()
            task = asyncio.create_task(self._deliver(row, slots), name=f"webhook-{row.id}")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _deliver(self, row: DeliveryRow, slots: asyncio.Semaphore) -> None:
        try:
            try:
                outcome = await self._attempt(row)
            except asyncio.CancelledError:  # shutting down: hand it back at once, not after the lease
                await asyncio.shield(self.db.release_delivery(row.id))
                raise
            await asyncio.shield(self._record(row, outcome))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook delivery %s failed unexpectedly", row.id)
        finally:
            slots.release()
            self.wake()

    async def _attempt(self, row: DeliveryRow) -> Outcome:
        if await self.db.webhook_gone(row.request_id):
            return Outcome("dropped", error="the receiver answered 410 Gone to an earlier event")
        try:  # checked at each connection (the name may resolve elsewhere now), by the address it uses
            status, error, retry_after = await self._post(row)
        except GatewayError as exc:  # a private address now, or no address at all: not retried
            return Outcome("dropped", error=f"{exc.code}: {exc.message}")
        if status is not None and 200 <= status < 300:
            return Outcome("delivered", status)
        if status == 410:
            return Outcome("dropped", status, error, gone=True)
        if row.event != TERMINAL_EVENT:
            return Outcome("dropped", status, error)
        return Outcome("retry", status, error, retry_after)

    async def _post(self, row: DeliveryRow) -> tuple[int | None, str | None, float | None]:
        """POST the signed payload: (status, error, retry_after). The response body is never read."""
        assert self._client is not None
        body = json.dumps(row.payload, separators=(",", ":"))
        msg_id = f"msg_{row.request_id}_{row.id}"  # the same on every retry: receivers dedupe on it
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(math.floor(now.timestamp())),
            "webhook-signature": self._secret(row.key_id).sign(msg_id, now, body),
        }
        timeout = self.settings.webhook_timeout_s
        try:
            async with asyncio.timeout(timeout):  # in all: httpx's timeout is per read or write
                async with self._client.stream("POST", row.url, content=body.encode(), headers=headers) as resp:
                    status = resp.status_code
                    retry_after = resp.headers.get("retry-after")
        except (TimeoutError, httpx.TimeoutException):
            return None, f"timed out after {timeout:g} s", None
        except httpx.HTTPError as exc:
            # The URL may carry the receiver's own token: keep it out of the log.
            text = str(exc).replace(row.url, "<webhook url>")[:200]
            return None, f"{type(exc).__name__}: {text}" if text else type(exc).__name__, None
        if 200 <= status < 300:
            return status, None, None
        return status, f"HTTP {status}", retry_after_s(retry_after) if status in (429, 503) else None

    async def _record(self, row: DeliveryRow, outcome: Outcome) -> None:
        db, did, rid = self.db, row.id, row.request_id
        state = outcome.state
        if state == "retry":
            delay = self._retry_delay(row.attempts, outcome.retry_after)
            if delay is None:
                state = "failed"
            else:
                at = datetime.now(UTC) + timedelta(seconds=delay)
                await db.retry_delivery(did, at=at, status=outcome.status, error=outcome.error)
        if state != "retry":
            await db.finish_delivery(did, state=state, status=outcome.status, error=outcome.error)
        if outcome.gone:
            await db.drop_deliveries(rid, error="the receiver answered 410 Gone")
        metrics.webhook_delivery(row.event, state)
        host = urlsplit(row.url).hostname
        level = logging.INFO if state == "delivered" else logging.WARNING
        log.log(
            level,
            "webhook %s (%s) of %s to %s, attempt %d: %s%s",
            did,
            row.event,
            rid,
            host,
            row.attempts,
            state,
            f" ({outcome.error})" if outcome.error else "",
        )

    def _retry_delay(self, attempts: int, retry_after: float | None) -> float | None:
        """Seconds until the next try after `attempts` tries, or None when they are spent."""
        delays = self.settings.webhook_retry_delays_s
        if attempts > len(delays):
            return None
        jitter = self.settings.webhook_retry_jitter
        delay = delays[attempts - 1] * (1 + random.uniform(-jitter, jitter))
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay
