"""Runs one claimed job to its end: rebuild it, route it, store the images, record the outcome.

The same code runs a synchronous image request and a prediction, in whichever process claimed it.
A job run again after a crash resumes its upstream tasks from the journal (see journal.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Protocol

from .. import metrics, pricing
from ..catalog import Catalog
from ..config import Settings
from ..errors import GatewayError
from ..imaging import EXTENSIONS, decode_image, encode_image
from ..providers.base import ImageJob, Provider, ProviderImage
from ..providers.hosted import HostedProvider
from ..routing import Router
from ..store.blobs import BlobStore
from ..store.db import Database
from ..store.records import JobStatus, RequestRow, TaskEnd
from ..timing import ms_since
from .channels import JobChannels
from .journal import DurableJournal
from .spec import from_record, read_inputs

log = logging.getLogger(__name__)


class JobEvents(Protocol):
    """Told when a job starts and ends (webhook deliveries hang off this)."""

    async def emit(self, record: RequestRow, event: str) -> None: ...


class NoEvents:
    async def emit(self, record: RequestRow, event: str) -> None:
        return None


class JobRunner:
    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        catalog: Catalog,
        router: Router,
        providers: dict[str, Provider],
        settings: Settings,
        channels: JobChannels,
        events: JobEvents | None = None,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.catalog = catalog
        self.router = router
        self.providers = providers
        self.settings = settings
        self.channels = channels
        self.events: JobEvents = events or NoEvents()
        self._stop_reason: dict[str, str] = {}  # why a running job's task was cancelled
        self._jobs: dict[str, ImageJob] = {}  # running jobs, to flag a user's cancel on them

    def stopping(self, request_id: str, reason: str) -> None:
        """Say why the job's task is about to be cancelled: "requested" (by the user) ends it as
        canceled; anything else ("shutdown", "lease lost") leaves it for another worker."""
        self._stop_reason[request_id] = reason
        job = self._jobs.get(request_id)
        if job is not None and reason == "requested":
            job.cancelled.set()  # providers cancel their upstream tasks only for this

    async def run(self, record: RequestRow) -> tuple[str, str | None]:
        """Returns how the job ended and the provider that served it (or was tried last)."""
        rid = record.id
        t0 = time.perf_counter()
        db = self.db
        job: ImageJob | None = None
        journal: DurableJournal | None = None
        try:
            # A first run has no upstream tasks yet: only a resumed job reads its journal.
            rows = await db.tasks_for(rid) if record.runs > 1 else []
            read_back = _read_back(record)
            journal = DurableJournal(db, self.blobs, rid, rows, self.settings.max_input_pixels, read_back=read_back)
            if record.cancel_requested:
                raise asyncio.CancelledError  # cancelled while no worker held it (e.g. after a crash)
            inputs, mask = await read_inputs(record, self.blobs)
            rebuild = functools.partial(
                from_record, record, self.catalog, self.settings, inputs=inputs, mask_bytes=mask
            )
            # Decoding input images is heavy work for a thread; without any, the job is its parameters
            # (a hop to a thread would cost more than the rebuild).
            job = await asyncio.to_thread(rebuild) if inputs or mask is not None else rebuild()
            job.journal = journal
            job.progress = self.channels.step(rid)
            job.preview = self.channels.previews.get(rid) if job.partial_images else None
            self._jobs[rid] = job
            if record.runs == 1:
                await self.events.emit(record, "start")
            params = record.params
            forced = self.catalog.resolve(params["forced_provider"])[1] if params.get("forced_provider") else None
            candidates = self.router.candidates(
                job.model, job.mode, job, forced=forced, provider=params.get("provider")
            )
            entry, result = await self.router.run(candidates, job)
            encoded, blob_ids = await self._encode_and_store(result.images, job, read_back=read_back)
        except asyncio.CancelledError:
            reason = self._stop_reason.pop(rid, "requested")
            if reason != "requested":
                # Shutting down: the lease runs out and another worker takes the job up, with the
                # tasks that ended here recorded (else it polls and downloads them again).
                if journal is not None:
                    await asyncio.shield(_record_quietly(journal, rid))
                raise
            await asyncio.shield(self._canceled(record, job, journal, t0))
            return JobStatus.CANCELED, _last_provider(job)
        except GatewayError as exc:
            # Status and headers (retry-after, x-should-retry) travel with the error to whoever waits.
            outcome = (JobStatus.FAILED, _last_provider(job))
            final = await db.mark_failed(
                rid,
                error={**exc.body()["error"], "status": exc.status, "headers": exc.headers},
                attempts=_attempts(job),
                duration_ms=ms_since(t0),
                logs=_logs(record, job, f"failed: {exc.message}"),
                charge=self._charge(job),
                ledger=_has_ledger(record),
                ended_tasks=_unrecorded(journal),
            )
        except Exception as exc:
            log.exception("job %s failed unexpectedly", rid)
            outcome = (JobStatus.FAILED, _last_provider(job))
            final = await db.mark_failed(
                rid,
                error={
                    "message": f"Internal error: {type(exc).__name__}",
                    "type": "server_error",
                    "param": None,
                    "code": "internal_error",
                    "status": 500,
                },
                attempts=_attempts(job),
                duration_ms=ms_since(t0),
                charge=self._charge(job),
                ledger=_has_ledger(record),
                ended_tasks=_unrecorded(journal),
            )
        else:
            outcome = (JobStatus.SUCCEEDED, entry.config_key)
            cost_micros, cost_lines = self._charge(job)
            final = await db.mark_succeeded(
                rid,
                provider=entry.config_key,
                cost=cost_micros / pricing.MICROS,
                cost_lines=cost_lines,
                ledger=_has_ledger(record),
                ended_tasks=_unrecorded(journal),
                currency=entry.pricing.currency,
                output_blob_ids=blob_ids,
                attempts=_attempts(job),
                output_size=str(result.size),
                output_format=job.output_format,
                duration_ms=ms_since(t0),
                params={
                    **record.params,
                    "ignored_params": sorted(set(result.ignored_params)),
                    "adjusted_params": dict(result.adjusted_params),
                    **({"engine": result.engine} if result.engine else {}),
                },
                logs=_logs(
                    record,
                    job,
                    f"succeeded: {len(encoded)} image(s) {result.size} {job.output_format} from {entry.config_key}",
                ),
            )
        finally:
            self._stop_reason.pop(rid, None)
            self._jobs.pop(rid, None)
            self.channels.steps.pop(rid, None)
        await self._finish(record, final)
        return outcome

    async def _canceled(
        self, record: RequestRow, job: ImageJob | None, journal: DurableJournal | None, t0: float
    ) -> None:
        """Cancel reaches the upstream: tasks still running there (this run's or a crashed run's)."""
        if journal is not None:
            for config_key, task in journal.submitted_tasks():
                entry = self.catalog.resolve(config_key)[1]
                impl = self.providers.get(entry.provider) if entry else None
                if entry is not None and isinstance(impl, HostedProvider):
                    await impl.cancel_quietly(entry, task)
        final = await self.db.mark_canceled(
            record.id,
            attempts=_attempts(job),
            duration_ms=ms_since(t0),
            charge=self._charge(job),
            ledger=_has_ledger(record),
            ended_tasks=_unrecorded(journal),
        )
        await self._finish(record, final)

    async def _finish(self, record: RequestRow, final: RequestRow) -> None:
        """Tell whoever waits: the webhook receiver and, in this process, the waiter (with the record
        the ending statement returned, so neither reads it again)."""
        if record.webhook:
            await self.events.emit(final, "completed")
        self.channels.done(record.id, final)

    def _charge(self, job: ImageJob | None) -> tuple[int, list[dict[str, Any]]]:
        """The actual cost from the attempts: every image made and billed, wherever it was made."""
        if job is None:
            return 0, []
        total, lines = pricing.actual(job.attempts, self.catalog)
        for line in lines:  # counted as settled: the charge is committed with the job's end, just after
            metrics.cost(job.model.id, line["provider"], line["total_cost"] / pricing.MICROS)
        return total, lines

    async def _encode_and_store(
        self, images: list[ProviderImage], job: ImageJob, *, read_back: bool
    ) -> tuple[list[bytes], list[str]]:
        """The images as asked for (encoded in a thread, where any needs encoding), and their blob ids
        (stored, at once; kept in the page cache only when the answer reads them back at once)."""
        if all(_passes_through(img, job) for img in images):
            encoded = self._encode(images, job)  # nothing to convert: no hop to a thread
        else:
            encoded = await asyncio.to_thread(self._encode, images, job)
        ext = EXTENSIONS[job.output_format]

        async def store(img: ProviderImage, data: bytes) -> str:
            # The provider's bytes as they came are stored by the journal already: not again.
            if img.blob_id and data is img.data:
                return img.blob_id
            return await self.blobs.put(data, ext=ext, cached=read_back)

        return encoded, list(await asyncio.gather(*map(store, images, encoded)))

    def _encode(self, images: list[ProviderImage], job: ImageJob) -> list[bytes]:
        encoded = []
        for img in images:
            if _passes_through(img, job):
                assert img.data is not None
                encoded.append(img.data)  # already what was asked for: the provider's bytes
                continue
            pixels = img.image
            if pixels is None:
                pixels = decode_image(img.data or b"", param="output", max_pixels=self.settings.max_input_pixels)
            encoded.append(encode_image(pixels, job.output_format, compression=job.output_compression))
        return encoded


def _passes_through(img: ProviderImage, job: ImageJob) -> bool:
    """Whether the provider's bytes are already what was asked for (format, no recompression)."""
    return img.data is not None and img.format == job.output_format and job.output_compression is None


def _logs(record: RequestRow, job: ImageJob | None, outcome: str) -> str:
    """The prediction's `logs`: which worker ran it, each attempt, and how it ended."""
    lines = [f"run {record.runs} on worker {record.claimed_by or '-'}"]
    for a in job.attempts if job is not None else []:
        what = a.error_class or ""
        lines.append(f"  {a.config_key}: {a.outcome} {what} in {a.duration_ms} ms".replace("  in", " in"))
    lines.append(outcome)
    return "\n".join(lines) + "\n"


def _unrecorded(journal: DurableJournal | None) -> list[TaskEnd]:
    """The upstream tasks' ends the job's ending transaction records with it."""
    return journal.take_unrecorded() if journal is not None else []


async def _record_quietly(journal: DurableJournal, request_id: str) -> None:
    try:
        await journal.record_unrecorded()
    except Exception:  # the next run polls those tasks again: slower, nothing lost
        log.warning("job %s: could not record its ended upstream tasks before handing it back", request_id)


def _read_back(record: RequestRow) -> bool:
    """Whether the job's answer reads its results' bytes at once (an images request's b64_json, or its
    stream of events), so that they are worth keeping in the page cache; otherwise a result is read
    once at most, later (its URL fetched), and its pages are let go once it is durable."""
    params = record.params
    return params.get("response_format") == "b64_json" or bool(params.get("stream"))


def _has_ledger(record: RequestRow) -> bool:
    """Requests of an API key held a reservation; the open gateway's have no ledger entry to settle."""
    return record.key_id is not None


def _last_provider(job: ImageJob | None) -> str | None:
    return job.attempts[-1].config_key if job is not None and job.attempts else None


def _attempts(job: ImageJob | None) -> list[dict[str, Any]]:
    return [a.to_dict() for a in job.attempts] if job is not None else []
