"""Payload retention: a periodic sweep that purges prompts and images once they are due.

`payload_retention = "metadata"`: due once the job has ended and the links it handed out have expired
(`url_ttl_seconds` after completion). `"full"`: due `payload_retention_days` after completion (None:
kept forever, and no sweep runs). Metadata (cost, status, timings, attempts) is always kept.

Runs in the processes that run jobs, once at start and then every `retention_sweep_interval_s`, in
batches; several processes sweeping one database is harmless (a purge skips what is already purged).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from .config import Settings
from .history import History
from .store.history import HistoryRows
from .store.models import utcnow
from .tasks import stop_task

log = logging.getLogger(__name__)
BATCH = 100


class RetentionSweeper:
    def __init__(self, *, history: History, rows: HistoryRows, settings: Settings) -> None:
        self.history = history
        self.rows = rows
        self.settings = settings
        self._task: asyncio.Task[None] | None = None

    def cutoff(self, now: datetime | None = None) -> datetime | None:
        return cutoff(self.settings, now or utcnow())

    async def start(self) -> None:
        if self.cutoff() is not None and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="retention-sweep")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def sweep(self) -> int:
        """Purge everything due, a batch at a time; returns how many requests were purged."""
        cutoff = self.cutoff()
        total = 0
        while cutoff is not None:
            ids = await self.rows.due_for_purge(cutoff, BATCH)
            if not ids:
                break
            total += len(await self.history.purge_payloads(ids))
            if len(ids) < BATCH:
                break
        if total:
            log.info("retention: purged the payloads of %d request(s)", total)
        return total

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("retention sweep failed")
            await asyncio.sleep(self.settings.retention_sweep_interval_s)


def cutoff(settings: Settings, now: datetime) -> datetime | None:
    """Requests that ended before this are due; None: nothing is ever due."""
    if settings.payload_retention == "metadata":
        return now - timedelta(seconds=settings.url_ttl_seconds)
    if settings.payload_retention_days is not None:
        return now - timedelta(days=settings.payload_retention_days)
    return None
