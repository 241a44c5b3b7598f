"""The assembled gateway: settings -> catalog, providers, router, database, blobs, service.

Built once per process (by the HTTP app's lifespan, or by the CLI for a local run) and passed down.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from .catalog import Catalog
from .config import Settings
from .jobs.runner import JobRunner
from .jobs.webhooks import Webhooks
from .jobs.worker import Completions, Worker
from .keys import Authenticator, KeyStore
from .predictions import PredictionService
from .providers import remote_adapters
from .providers.base import Provider
from .providers.local import LocalProvider
from .ratelimit import RateLimiter
from .retention import RetentionSweeper
from .routing import Router
from .service import ImageService
from .store.blobs import LocalBlobStore, URLSigner
from .store.db import Database, make_private

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.catalog = Catalog.load(settings.catalog_path)
        self.providers: dict[str, Provider] = {"local": LocalProvider(settings)}
        for adapter in remote_adapters():
            self.providers[adapter.name] = adapter(settings)
        self.router = Router(self.providers, settings)
        self.db = Database(settings.resolved_database_url())
        self.blobs = LocalBlobStore(settings.data_dir / "blobs")
        self.signer = URLSigner(settings.resolved_url_secret())
        self.keys = KeyStore(self.db, self.catalog)
        self.auth = Authenticator(settings, self.keys)
        self.limits = RateLimiter(settings.rate_limit_url)
        self.completions = Completions()
        self.webhooks = Webhooks(self)
        self.runner = JobRunner(self, events=self.webhooks)
        self.worker = Worker(self)
        self.images = ImageService(self)
        self.predictions = PredictionService(self)
        self.retention = RetentionSweeper(self)  # purges payloads that are due (payload_retention)
        # Webhook bodies are the prediction object, exactly as the predictions API serves it.
        self.webhooks.render = lambda record: self.predictions.render(record, self.webhooks.base_url())

    async def start(self, *, workers: bool = True) -> None:
        _private_data_dir(self.settings.data_dir)
        await self.db.start()  # the SQLite file and its journals: 0600 (Database.start)
        if workers:
            await self.worker.start()
            if self.worker.concurrency:  # deliveries go from the processes that run jobs
                await self.webhooks.start()
                await self.retention.start()  # so does the retention sweep

    async def close(self) -> None:
        await self.worker.stop()
        await self.webhooks.stop()
        await self.retention.stop()
        for provider in self.providers.values():
            await provider.aclose()
        await self.limits.aclose()
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
