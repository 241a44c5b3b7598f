"""The composition root: settings -> every part of the gateway, each given exactly what it uses.

Built once per process (by the HTTP app's lifespan, or by the CLI for a local run). Nothing else
builds services, and no module but this one and the entry points (api/, cli.py) knows `Gateway`:
the parts know only their collaborators, which arrive in their constructors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

from .catalog import Catalog
from .config import Settings
from .history import History
from .idempotency import Idempotency
from .jobs.channels import JobChannels
from .jobs.runner import JobRunner
from .jobs.webhooks import Webhooks
from .jobs.worker import Worker
from .keys import Authenticator, KeyStore
from .links import OwnLinks, URLSigner
from .prediction_view import PredictionView
from .predictions import PredictionService
from .provider_health.backends import open_provider_health
from .providers import DIALECTS
from .providers.base import Provider
from .providers.hosted import HostedProvider
from .providers.local import LocalProvider
from .ratelimit import RateLimiter
from .retention import RetentionSweeper
from .routing import Router
from .service import ImageService
from .store.blob_url import open_blob_store
from .store.db import Database, make_private
from .store.engine import sqlite_path
from .store.history import HistoryRows
from .store.idempotency import IdempotencyKeys
from .store.keys import KeyRows
from .store.notices import JobNotices
from .store.sqlite_watch import SQLiteWatch

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.catalog = Catalog.load(settings.catalog_path)
        self.providers: dict[str, Provider] = {"local": LocalProvider(settings)}
        for dialect in DIALECTS:
            self.providers[dialect.name] = HostedProvider(dialect, settings)
        # Breakers and route latencies: this process's own, or shared through Redis / PostgreSQL.
        self.health = open_provider_health(settings)
        self.router = Router(self.providers, settings, self.health)

        # The store.
        self.db = Database(settings.resolved_database_url())
        self.blobs = open_blob_store(settings)  # KONTEXT_BLOB_URL: a bucket, else data_dir/blobs
        history_rows = HistoryRows(self.db)
        self.links = OwnLinks(
            URLSigner(settings.resolved_url_secret()),
            self.blobs,
            self.db,
            public_url=settings.public_url,
            ttl_s=settings.url_ttl_seconds,
            presigned=settings.blob_links == "presigned",
        )

        # Accounts.
        self.keys = KeyStore(KeyRows(self.db), self.catalog)
        self.auth = Authenticator(settings, self.keys)
        self.limits = RateLimiter(settings.rate_limit_url)
        self.idempotency = Idempotency(IdempotencyKeys(self.db), settings.idempotency_ttl_s)

        # Jobs: the runner and the workers, and what waiters and the runner share in this process.
        self.channels = JobChannels()
        view = PredictionView(self.links, self.channels)
        # Webhook bodies are the prediction object, exactly as the predictions API serves it.
        self.webhooks = Webhooks(self.db, settings, render=view.render)
        self.runner = JobRunner(
            db=self.db,
            blobs=self.blobs,
            catalog=self.catalog,
            router=self.router,
            providers=self.providers,
            settings=settings,
            channels=self.channels,
            events=self.webhooks,
        )
        self.worker = Worker(self.db, self.runner, settings)
        # PostgreSQL tells the claim loops of jobs enqueued elsewhere, and waiters of jobs ended elsewhere;
        # on a SQLite file shared by an API process and worker processes, a watch looks for them.
        self.notices: JobNotices | None = None
        self.watch: SQLiteWatch | None = None

        # The two APIs on the jobs, and the history.
        self.images = ImageService(
            settings=settings,
            catalog=self.catalog,
            router=self.router,
            db=self.db,
            blobs=self.blobs,
            links=self.links,
            channels=self.channels,
            jobs=self.worker,
            limits=self.limits,
            keys=self.keys,
            events=self.webhooks,
            ends_heard=self._ends_heard,
        )
        self.predictions = PredictionService(images=self.images, db=self.db, view=view, settings=settings)
        self.history = History(
            rows=history_rows, db=self.db, blobs=self.blobs, catalog=self.catalog, links=self.links, settings=settings
        )
        # Purges payloads that are due (payload_retention).
        self.retention = RetentionSweeper(history=self.history, rows=history_rows, settings=settings)

    async def start(self, *, workers: bool = True, api: bool = True) -> None:
        """`workers`: run jobs (as the settings say); `api`: whether this process serves the API too
        (`kontext worker` does not: on a SQLite file, it watches for jobs other processes queue)."""
        _private_data_dir(self.settings.data_dir)
        # A missing bucket, an endpoint out of reach or a refused key fails here, in one line.
        await self.blobs.writable()
        await self.db.start()  # the SQLite file and its journals: 0600 (Database.start)
        if workers:
            await self.worker.start()
            if JobNotices.can_listen(self.db.engine):  # jobs for the claim loops, ends for the waiters
                self.notices = JobNotices(
                    self.db.engine,
                    new_job=self.worker.wake if self.worker.concurrency else None,
                    ended=self.channels.done,
                )
                await self.notices.start()
            elif (path := sqlite_path(self.db.url)) is not None:
                self.watch = self._sqlite_watch(path, claims=not api)
                if self.watch is not None:
                    await self.watch.start()
            if self.worker.concurrency:  # deliveries go from the processes that run jobs
                await self.webhooks.start()
                await self.retention.start()  # so does the retention sweep

    def _ends_heard(self) -> bool:
        """Whether this process hears now of the ends of jobs run in others."""
        if self.notices is not None:
            return self.notices.listening.is_set()
        return self.watch is not None and self.watch.watching_ends

    def _sqlite_watch(self, path: Path, *, claims: bool) -> SQLiteWatch | None:
        """What this process looks for in the SQLite file: jobs to claim in a worker process (one that
        serves no API: a serving process hands its own jobs over at once), the ends of the jobs it
        waits on in a process that runs none. None: nothing (the embedded default runs and waits on
        its own jobs, and hears of them in-process)."""
        new_job = self.worker.wake if claims and self.worker.concurrency else None
        ended = self.channels.done if not self.worker.concurrency else None
        if new_job is None and ended is None:
            return None
        return SQLiteWatch(
            path,
            new_job=new_job,
            ended=ended,
            waited=self.channels.waited,
            someone_waits=self.channels.someone_waits,
        )

    async def readiness(self, *, timeout_s: float) -> dict[str, str]:
        """Each readiness check's answer: "ok", or what is wrong (see api/health.py)."""

        async def database() -> str | None:
            return await self.db.schema_problem()

        async def blob_store() -> str | None:
            await self.blobs.writable()
            return None

        async def workers() -> str | None:
            if not self.worker.concurrency:
                return None  # this process only serves the API: jobs run in `kontext worker` processes
            if self.worker.draining:
                return "draining: taking no more jobs"
            return None if self.worker.claiming else "the claim loops are not running"

        async def answer(check: Callable[[], Awaitable[str | None]]) -> str:
            try:
                async with asyncio.timeout(timeout_s):
                    return await check() or "ok"
            except TimeoutError:
                return f"no answer within {timeout_s:g} s"
            except Exception as exc:
                return f"{type(exc).__name__}: {str(exc)[:200]}"

        names = ("database", "blob_store", "workers")
        results = await asyncio.gather(*(answer(c) for c in (database, blob_store, workers)))
        return dict(zip(names, results, strict=True))

    def begin_drain(self) -> None:
        """SIGTERM: take no more jobs; the running ones have `drain_timeout_s` to end before close()
        hands them back."""
        self.worker.drain(self.settings.drain_timeout_s)

    async def close(self) -> None:
        await self.worker.stop()  # after begin_drain(): waits out the drain's deadline
        if self.notices is not None:
            await self.notices.close()
        if self.watch is not None:
            await self.watch.close()
        await self.webhooks.stop()
        await self.retention.stop()
        for provider in self.providers.values():
            await provider.aclose()
        await self.limits.aclose()
        await self.health.aclose()
        await self.blobs.close()  # after the workers: a result being written is finished, not left aside
        await self.db.close()


def _private_data_dir(path: Path) -> None:
    """The data directory holds the database, the secrets and the images: only its owner may enter
    it. Made 0700, or tightened to 0700 when group or others may (its contents stay as they are);
    its secret files 0600. A shared directory (sticky, as /tmp) is another's to manage: left alone."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name == "posix" and path.stat().st_mode & stat.S_ISVTX:
        log.warning(
            "the data directory %s is a shared directory (sticky bit): not made private; "
            "set KONTEXT_DATA_DIR to a folder of its own",
            path,
        )
        return
    make_private(path, 0o700)
    for name in ("secret.key", "webhook_secret"):  # made 0600; tightened should anyone have loosened them
        make_private(path / name, 0o600)
