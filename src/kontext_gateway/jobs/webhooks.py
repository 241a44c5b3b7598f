"""Webhooks for jobs, as Replicate sends them: events `start`, `output`, `logs`, `completed`, the body
the prediction object, signed per Standard Webhooks with the secret of the API key that made the
prediction, which that key (and only it) reads at `GET /v1/webhooks/default/secret`.

Secrets. The gateway has one secret (`KONTEXT_WEBHOOK_SECRET`, else data_dir/webhook_secret, made on
first use, mode 0600). It signs the deliveries of predictions made without a key (the open gateway),
and it is what the open gateway serves, unchanged from before keys had secrets of their own. Each
key's secret is derived from it, never stored (not in the database, not on disk):

    whsec_ + base64(HMAC-SHA256(gateway secret bytes, KEY_SECRET_CONTEXT + key id, UTF-8))

so it is the same in every process and after a restart, differs per key (the admin key from the
environment has the id "admin"), and one key's secret reveals neither the gateway secret nor any other
key's. Rotating the gateway secret rotates every key's with it (receivers fetch theirs again). Whoever
holds the gateway secret can derive every key's: the operator, and anyone who read it from the
endpoint while the gateway was open (no keys, on loopback); rotate it when handing out the first keys
if that matters. A keyed gateway never serves it: every caller there has a key, and reads its own.

`Webhooks.emit` (the runner's JobEvents) queues a delivery row per event that passes the
prediction's `webhook_events_filter`; dispatch.py sends them. The predictions API validates a
webhook URL at creation with `validate_webhook_url` (422 when it reaches a private address).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from standardwebhooks import Webhook

from ..config import Settings
from ..net import ensure_public_url
from ..store.db import Database
from ..store.records import JobStatus, RequestRow
from ..tasks import stop_task
from .dispatch import WebhookDispatcher

log = logging.getLogger(__name__)

EVENTS = ("start", "output", "logs", "completed")
THROTTLED = ("output", "logs")  # at most one every THROTTLE_S per prediction, as Replicate sends them
THROTTLE_S = 0.5
SWEEP_GRACE_S = 10.0  # a job that ended this recently is its runner's to announce
SECRET_PREFIX = "whsec_"
KEY_SECRET_CONTEXT = b"kontext webhook secret\0"  # then the key's id: what each key's secret is derived for

Render = Callable[[RequestRow, str], dict[str, Any]]  # (record, base URL) -> the prediction object


async def validate_webhook_url(url: str, settings: Settings) -> None:
    """Raise GatewayError 422 (`invalid_url` or `url_not_allowed`, param `webhook`) unless the URL is
    http(s) and reaches only public addresses (or the operator allows private ones)."""
    await ensure_public_url(url, allow_private=settings.allow_private_urls, param="webhook", status=422)


class WebhookSecret:
    """`whsec_` + base64 of the HMAC key. Never logged: its repr hides it."""

    def __init__(self, key: str) -> None:
        raw = key.removeprefix(SECRET_PREFIX)
        try:
            decoded = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("The webhook secret must be 'whsec_' followed by base64.") from None
        if len(decoded) < 24:  # Standard Webhooks: 24 to 64 bytes
            raise ValueError("The webhook secret is too short: use at least 24 random bytes.")
        self.key = SECRET_PREFIX + raw
        self._bytes = decoded
        self._webhook = Webhook(self.key)

    def derive(self, key_id: str) -> WebhookSecret:
        """The secret of the API key `key_id`, derived from this (the gateway's) one: see the module."""
        digest = hmac.new(self._bytes, KEY_SECRET_CONTEXT + key_id.encode(), hashlib.sha256).digest()
        return WebhookSecret(SECRET_PREFIX + base64.b64encode(digest).decode())

    def sign(self, msg_id: str, at: datetime, body: str) -> str:
        """The `webhook-signature` header value (`v1,<base64>`) for this message."""
        return self._webhook.sign(msg_id, at, body)

    def __repr__(self) -> str:
        return "WebhookSecret('whsec_…')"

    @classmethod
    def load(cls, settings: Settings) -> WebhookSecret:
        """The configured secret, else the one kept in data_dir/webhook_secret (made on first use)."""
        if settings.webhook_secret is not None:
            return cls(settings.webhook_secret.get_secret_value())
        path = settings.data_dir / "webhook_secret"
        if not path.exists():
            settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # private, as Gateway.start keeps it
            key = SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()
            # Written whole to a private temp file, then linked into place: two processes starting at
            # once agree on one secret, and none reads a half-written file.
            fd, tmp = tempfile.mkstemp(dir=settings.data_dir, prefix=".webhook_secret.")  # mode 0600
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(key)
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                os.unlink(tmp)
        return cls(path.read_text().strip())


class Webhooks:
    """The runner's JobEvents: queues the deliveries; `start`/`stop` run the dispatcher and the sweep.

    `render` is the prediction object's renderer (the predictions API's own), given the record and
    the base URL its links point at."""

    def __init__(self, db: Database, settings: Settings, render: Render) -> None:
        self.db = db
        self.settings = settings
        self.render = render
        self.dispatcher = WebhookDispatcher(db, settings, self.secret_for)
        self._last_progress: dict[str, float] = {}  # prediction id -> when an output/logs event last went
        self._sweeper: asyncio.Task[None] | None = None

    @cached_property
    def secret(self) -> WebhookSecret:
        """The gateway's secret: signs what was made without a key; every key's is derived from it."""
        return WebhookSecret.load(self.settings)

    def secret_for(self, key_id: str | None) -> WebhookSecret:
        """The secret that signs the deliveries of predictions made by `key_id` (None: no key)."""
        return self.secret if key_id is None else self.secret.derive(key_id)

    async def start(self) -> None:
        await self.dispatcher.start()
        await self.sweep()
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="webhook-sweep")

    async def stop(self) -> None:
        sweeper, self._sweeper = self._sweeper, None
        await stop_task(sweeper)
        await self.dispatcher.stop()

    async def sweep(self) -> None:
        """Queue the `completed` webhook of jobs that ended without it: a crash between a job's end
        and the queueing, or a queueing that failed (a locked database...). A repeat is ignored."""
        now = datetime.now().astimezone()
        # Jobs that ended in the last seconds are left to their runner, which queues the webhook
        # itself: sweeping them too could queue a second one.
        try:
            for record in await self.db.ended_without_completed_webhook(
                now - timedelta(days=1), now - timedelta(seconds=SWEEP_GRACE_S)
            ):
                if self.wants(record, "completed"):
                    await self.emit(record, "completed")
        except Exception:
            log.exception("announcing jobs that ended without their completed webhook failed")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.webhook_sweep_interval_s)
            await self.sweep()

    @staticmethod
    def wants(record: RequestRow, event: str) -> bool:
        """Whether the prediction's filter lets this event through (no filter: every event)."""
        chosen = record.webhook_events
        return not chosen or event in chosen

    async def emit(self, record: RequestRow, event: str) -> None:
        if not record.webhook or event not in EVENTS:
            return
        rid = record.id
        try:
            if event == "completed":
                if any(d.event == "completed" for d in await self.db.list_deliveries(rid)):
                    return  # told already (a second cancel, say): the end is announced once
                # No partial outputs here: the output event goes once, right before the end, with the
                # prediction as it then is (a single-output cog model sends none; clients expect one).
                if record.status == JobStatus.SUCCEEDED and self.wants(record, "output") and not self._throttled(rid):
                    await self._queue(record, "output")
                self._last_progress.pop(rid, None)
            elif event in THROTTLED and self._throttled(rid):
                return  # dropped, as Replicate drops them; the terminal event carries the final state
            if self.wants(record, event):
                await self._queue(record, event)
        except Exception:
            log.exception("queueing the %s webhook of %s failed", event, rid)

    def _throttled(self, rid: str) -> bool:
        now = time.monotonic()
        last = self._last_progress.get(rid)
        if last is not None and now - last < THROTTLE_S:
            return True
        self._last_progress[rid] = now
        return False

    async def _queue(self, record: RequestRow, event: str) -> None:
        assert record.webhook is not None
        payload = self.render(record, self.base_url())
        await self.db.add_delivery(record.id, event=event, url=record.webhook, payload=payload)
        self.dispatcher.wake()

    def base_url(self) -> str:
        """Where links in payloads point: no request to take it from, so the configured public URL."""
        settings = self.settings
        return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")
