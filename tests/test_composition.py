"""The parts of the gateway stand alone: each is built from exactly the collaborators it uses, so a test
(or another program) can build one without the rest. Here: the image service, the job runner and a
worker, each with real stores (SQLite, a blob directory) and a provider that draws a fixed picture."""

from __future__ import annotations

import asyncio
import io
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import cached_pages, noise_png, open_image, skip_unless_pages_can_be_dropped
from kontext_gateway.catalog import Catalog
from kontext_gateway.config import Settings
from kontext_gateway.jobs.channels import JobChannels
from kontext_gateway.jobs.runner import JobRunner, NoEvents
from kontext_gateway.jobs.worker import Worker
from kontext_gateway.keys import KeyStore
from kontext_gateway.links import OwnLinks, URLSigner
from kontext_gateway.params import Size
from kontext_gateway.protocol import ImageSource, image_call
from kontext_gateway.providers.base import Attempt, ImageJob, ProviderImage, ProviderResult
from kontext_gateway.providers.calls import Task
from kontext_gateway.ratelimit import RateLimiter
from kontext_gateway.routing import Router
from kontext_gateway.service import ImageService
from kontext_gateway.store.blobs import LocalBlobStore
from kontext_gateway.store.db import Database
from kontext_gateway.store.keys import KeyRows
from kontext_gateway.store.records import JobStatus, Lane, RequestRow


def red_png(size: Size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size.width, size.height), (200, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Painter:
    """A provider that serves kontext-tiny with a red picture of the size asked."""

    name = "local"
    lane = Lane.LOCAL
    jobs: list[ImageJob] = field(default_factory=list)

    def handling(self, entry: Any) -> dict[str, dict[str, str]]:
        return {}

    def available(self, entry: Any) -> bool:
        return True

    def unavailable_reason(self, entry: Any) -> str:
        return ""

    def unsupported(self, entry: Any, job: ImageJob) -> None:
        return None

    async def generate(self, entry: Any, job: ImageJob) -> ProviderResult:
        self.jobs.append(job)
        size = job.size.size or Size(16, 16)
        job.attempts.append(Attempt("local", entry.config_key, "succeeded", 1, images=job.n))
        return ProviderResult(images=[ProviderImage(data=red_png(size), format="png")] * job.n, size=size)

    async def aclose(self) -> None:
        pass


@dataclass
class Parts:
    settings: Settings
    db: Database
    blobs: LocalBlobStore
    catalog: Catalog
    router: Router
    painter: Painter
    channels: JobChannels


@pytest.fixture
async def parts(tmp_path: Path) -> Any:
    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'k.db'}", workers=1, job_poll_interval_s=0.05
    )
    db = Database(settings.resolved_database_url())
    await db.start()
    painter = Painter()
    try:
        yield Parts(
            settings,
            db,
            LocalBlobStore(tmp_path / "blobs"),
            Catalog.load(),
            Router({"local": painter}, settings),
            painter,
            JobChannels(),
        )
    finally:
        await db.close()


@dataclass
class Queue:
    """The service's view of where jobs run: told when one is enqueued."""

    concurrency: int = 0
    draining: bool = False
    woken: int = 0

    def wake(self) -> None:
        self.woken += 1

    def cancel(self, request_id: str) -> bool:
        return False

    def runs(self, request_id: str) -> bool:
        return False

    async def reserve(self, lane: Lane) -> str | None:
        return None  # no slot here: every job is queued for a worker to claim

    def unreserve(self, lane: Lane) -> None:
        raise AssertionError("nothing was reserved")

    def hand(self, record: RequestRow) -> None:
        raise AssertionError("nothing was reserved")


def image_service(p: Parts, queue: Queue) -> ImageService:
    links = OwnLinks(URLSigner(b"s" * 32), p.blobs, p.db, public_url=None, ttl_s=60)
    return ImageService(
        settings=p.settings,
        catalog=p.catalog,
        router=p.router,
        db=p.db,
        blobs=p.blobs,
        links=links,
        channels=p.channels,
        jobs=queue,
        limits=RateLimiter(),
        keys=KeyStore(KeyRows(p.db), p.catalog),
        events=NoEvents(),
    )


async def test_the_image_service_alone_validates_prices_and_enqueues(parts: Parts) -> None:
    queue = Queue()
    service = image_service(parts, queue)
    call = image_call("text-to-image", {"model": "kontext-tiny", "prompt": "a red square", "size": "32x32", "n": 2})
    estimate = await service.estimate(call, base_url="http://gw.test/")
    assert estimate["n"] == 2 and estimate["size"] == "32x32"
    rid = await service.submit(call, base_url="http://gw.test/")
    record = await parts.db.get_request(rid)
    assert record is not None and record.status == JobStatus.STARTING and record.params["n"] == 2
    assert queue.woken == 1 and parts.painter.jobs == []  # enqueued, not run: running is a worker's


def painting_runner(parts: Parts) -> JobRunner:
    """The runner on the parts' own router, its jobs painted by `parts.painter`."""
    return JobRunner(
        db=parts.db,
        blobs=parts.blobs,
        catalog=parts.catalog,
        router=parts.router,
        providers={"local": parts.painter},
        settings=parts.settings,
        channels=parts.channels,
    )


async def test_the_runner_alone_runs_a_job_to_its_end(parts: Parts) -> None:
    rid = await image_service(parts, Queue()).submit(
        image_call("text-to-image", {"model": "kontext-tiny", "prompt": "a red square", "size": "24x16"}),
        base_url="http://gw.test/",
    )
    assert await parts.db.claim_next("test-worker", 30, Lane.HOSTED) is None  # an engine job: not that lane
    claimed = await parts.db.claim_next("test-worker", 30, Lane.LOCAL)
    assert claimed is not None and claimed.id == rid and claimed.lane == Lane.LOCAL
    runner = painting_runner(parts)
    status, provider = await runner.run(claimed)
    assert (status, provider) == (JobStatus.SUCCEEDED, "local/kontext-tiny")
    record = await parts.db.get_request(rid)
    assert record is not None and record.output_size == "24x16"
    stored = await parts.blobs.get(record.output_blob_ids[0])
    assert stored is not None and Image.open(io.BytesIO(stored)).size == (24, 16)


@dataclass
class Recorder:
    """Stands in for the runner: records what the worker hands it."""

    ran: list[RequestRow] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, record: RequestRow) -> tuple[str, str | None]:
        self.ran.append(record)
        self.done.set()
        return JobStatus.SUCCEEDED, None

    def stopping(self, request_id: str, reason: str) -> None:
        pass


async def test_a_worker_alone_claims_and_hands_over_each_job_once(parts: Parts) -> None:
    rid = await image_service(parts, Queue()).submit(
        image_call("text-to-image", {"model": "kontext-tiny", "prompt": "a red square"}), base_url="http://gw.test/"
    )
    recorder = Recorder()
    worker = Worker(parts.db, recorder, parts.settings)  # type: ignore[arg-type]
    await worker.start()
    try:
        async with asyncio.timeout(30):
            await recorder.done.wait()
    finally:
        await worker.stop()
    assert [r.id for r in recorder.ran] == [rid] and recorder.ran[0].runs == 1


@dataclass
class Holder:
    """Stands in for the runner: holds every job it is handed until released, counting how many at once."""

    running: dict[str, RequestRow] = field(default_factory=dict)
    seen: list[RequestRow] = field(default_factory=list)
    peak: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self, record: RequestRow) -> tuple[str, str | None]:
        async with self.changed:
            self.running[record.id] = record
            self.seen.append(record)
            self.peak = max(self.peak, len(self.running))
            self.changed.notify_all()
        await self.release.wait()
        self.running.pop(record.id)
        return JobStatus.SUCCEEDED, None

    def stopping(self, request_id: str, reason: str) -> None:
        pass

    async def until(self, test: Any) -> None:
        async with asyncio.timeout(60), self.changed:
            await self.changed.wait_for(lambda: test(self))


async def enqueue(db: Database, lane: Lane, count: int = 1) -> list[str]:
    ids = [f"req_{lane}_{i}_{uuid.uuid4().hex[:8]}" for i in range(count)]
    for rid in ids:
        await db.create_request(
            id=rid, endpoint="images.generations", model="m", mode="text-to-image", params={}, lane=lane
        )
    return ids


async def test_shipped_defaults_run_hundreds_of_hosted_jobs_at_once_and_keep_a_lane_for_the_engine(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'k.db'}")
    assert (settings.workers, settings.local_workers) == (256, 1)  # the shipped defaults
    db = Database(settings.resolved_database_url())
    await db.start()
    holder = Holder()
    worker = Worker(db, holder, settings)  # type: ignore[arg-type]
    try:
        hosted = await enqueue(db, Lane.HOSTED, 300)
        await worker.start()
        await holder.until(lambda h: len(h.running) == 256)  # every hosted slot taken, 44 still queued
        local = await enqueue(db, Lane.LOCAL, 2)
        worker.wake()
        await holder.until(lambda h: local[0] in h.running)  # the engine's job does not queue behind them
        record = await db.get_request(local[1])
        assert record is not None and record.status == JobStatus.STARTING  # its lane holds one at a time
        assert holder.peak == 257 and sum(rid in holder.running for rid in hosted) == 256
    finally:
        holder.release.set()
        await worker.stop()
        await db.close()


async def test_a_hosted_job_does_not_wait_for_a_busy_engine(parts: Parts) -> None:
    holder = Holder()
    worker = Worker(parts.db, holder, parts.settings)  # type: ignore[arg-type]
    assert worker.lanes == {Lane.HOSTED: 1, Lane.LOCAL: 1}
    try:
        local = await enqueue(parts.db, Lane.LOCAL)
        await worker.start()
        await holder.until(lambda h: local[0] in h.running)
        hosted = await enqueue(parts.db, Lane.HOSTED)
        worker.wake()
        await holder.until(lambda h: hosted[0] in h.running)
    finally:
        holder.release.set()
        await worker.stop()


def test_an_api_only_process_claims_from_neither_lane(parts: Parts) -> None:
    worker = Worker(parts.db, Holder(), parts.settings, concurrency=0)  # type: ignore[arg-type]
    assert worker.lanes == {Lane.HOSTED: 0, Lane.LOCAL: 0} and worker.concurrency == 0


def test_a_worker_for_the_engine_alone_claims_only_local_jobs(parts: Parts) -> None:
    parts.settings.workers, parts.settings.local_workers = 0, 1  # set explicitly: one per GPU
    worker = Worker(parts.db, Holder(), parts.settings)  # type: ignore[arg-type]
    assert worker.lanes == {Lane.HOSTED: 0, Lane.LOCAL: 1} and worker.concurrency == 1


async def test_a_job_enqueued_with_a_free_slot_is_handed_over_without_a_claim(parts: Parts) -> None:
    holder = Holder()
    # Two engine slots: a claim the loop may be trying holds one of them, the other is free.
    parts.settings.local_workers = 2
    worker = Worker(parts.db, holder, parts.settings)  # type: ignore[arg-type]
    await worker.start()
    service = image_service(parts, worker)  # type: ignore[arg-type]
    call = image_call("text-to-image", {"model": "kontext-tiny", "prompt": "a red square"})
    try:
        rid = await service.submit(call, base_url="http://gw.test/")
        record = await parts.db.get_request(rid)
        # Written as this worker's, already running: no claim statement, no wait for the claim loop.
        assert record is not None and (record.status, record.claimed_by, record.runs) == (
            JobStatus.PROCESSING,
            worker.id,
            1,
        )
        assert worker.runs(rid)
        await holder.until(lambda h: rid in h.running)  # its task starts at the loop's next turn
        assert holder.seen[0].id == rid and holder.seen[0].claimed_by == worker.id
    finally:
        holder.release.set()
        await worker.stop()


@dataclass
class Gates:
    """Stands in for the runner: each job runs until its own gate opens; a cancelled one says why."""

    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    finished: list[str] = field(default_factory=list)
    stopped: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self, record: RequestRow) -> tuple[str, str | None]:
        gate = self.gates.setdefault(record.id, asyncio.Event())
        async with self.changed:
            self.running.add(record.id)
            self.changed.notify_all()
        try:
            await gate.wait()
        finally:
            self.running.discard(record.id)
        async with self.changed:
            self.finished.append(record.id)
            self.changed.notify_all()
        return JobStatus.SUCCEEDED, None

    def stopping(self, request_id: str, reason: str) -> None:
        self.stopped[request_id] = reason

    async def until(self, test: Any) -> None:
        async with asyncio.timeout(60), self.changed:
            await self.changed.wait_for(lambda: test(self))


async def test_a_draining_worker_takes_no_more_jobs_lets_running_ones_finish_and_hands_back_the_rest(
    parts: Parts,
) -> None:
    parts.settings.workers = 2
    gates = Gates()
    worker = Worker(parts.db, gates, parts.settings)  # type: ignore[arg-type]
    first, second = await enqueue(parts.db, Lane.HOSTED, 2)
    await worker.start()
    stopping: asyncio.Task[None] | None = None
    try:
        await gates.until(lambda g: g.running == {first, second})
        worker.drain(3600)  # SIGTERM, with all the time in the world
        assert not worker.claiming and not worker.has_room(Lane.HOSTED)
        (third,) = await enqueue(parts.db, Lane.HOSTED)
        worker.wake()
        stopping = asyncio.create_task(worker.stop())
        gates.gates[first].set()  # ends within the drain: finished here
        await gates.until(lambda g: first in g.finished)
        assert not stopping.done()  # still waiting for the second
        worker.hand_back_now()  # a second SIGTERM
        await asyncio.wait_for(stopping, 60)
    finally:
        for gate in gates.gates.values():
            gate.set()
        if stopping is None:
            await worker.stop()
    assert gates.finished == [first] and gates.stopped == {second: "shutdown"}
    handed_back, never_taken = await parts.db.get_request(second), await parts.db.get_request(third)
    assert handed_back is not None and handed_back.status == JobStatus.PROCESSING
    assert never_taken is not None and never_taken.status == JobStatus.STARTING
    # Released: the next worker takes it up at once, not when its lease would have run out.
    successor = Worker(parts.db, gates, parts.settings)  # type: ignore[arg-type]
    resumed = await parts.db.claim_next(successor.id, parts.settings.job_lease_s)
    assert resumed is not None and resumed.id == second and resumed.runs == 2


async def test_a_drain_past_its_deadline_hands_the_running_jobs_back_at_once(parts: Parts) -> None:
    gates = Gates()
    worker = Worker(parts.db, gates, parts.settings)  # type: ignore[arg-type]
    (rid,) = await enqueue(parts.db, Lane.HOSTED)
    await worker.start()
    try:
        await gates.until(lambda g: rid in g.running)
        worker.drain(0)
        await asyncio.wait_for(worker.stop(), 60)
    finally:
        for gate in gates.gates.values():
            gate.set()
    assert gates.stopped == {rid: "shutdown"} and not gates.finished
    record = await parts.db.get_request(rid)
    assert record is not None and record.claimed_by == worker.id
    resumed = await parts.db.claim_next("another-worker", parts.settings.job_lease_s)
    assert resumed is not None and resumed.id == rid


@dataclass
class Journaling(Painter):
    """A hosted-like provider: one upstream task per job, in the job's journal; its images are stored
    when it ends. With `hold`, the job then waits (as if converting its images) until cancelled."""

    name = "local"
    hold: asyncio.Event | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(self, entry: Any, job: ImageJob) -> ProviderResult:
        assert job.journal is not None
        row = await job.journal.submitted(0, entry.config_key, Task("upstream-1"))
        size = job.size.size or Size(16, 16)
        image = ProviderImage(data=red_png(size), format="png", size=size)
        await job.journal.finished(row, images=[image])
        self.ended.set()
        if self.hold is not None:
            await self.hold.wait()
        job.attempts.append(Attempt("local", entry.config_key, "succeeded", 1, images=1))
        return ProviderResult(images=[image], size=size)


def journaling_runner(parts: Parts, provider: Journaling) -> JobRunner:
    return JobRunner(
        db=parts.db,
        blobs=parts.blobs,
        catalog=parts.catalog,
        router=Router({"local": provider}, parts.settings),
        providers={"local": provider},
        settings=parts.settings,
        channels=parts.channels,
    )


async def claimed_job(parts: Parts, **fields: Any) -> RequestRow:
    fields = {"model": "kontext-tiny", "prompt": "a red square", "size": "24x16", **fields}
    await image_service(parts, Queue()).submit(image_call("text-to-image", fields), base_url="http://gw.test/")
    claimed = await parts.db.claim_next("test-worker", 30, Lane.LOCAL)
    assert claimed is not None
    return claimed


async def test_a_jobs_task_end_is_recorded_by_its_ending_transaction(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    separately: list[Any] = []

    async def finish_tasks(ended: Any) -> None:
        separately.append(ended)

    monkeypatch.setattr(parts.db, "finish_tasks", finish_tasks)
    claimed = await claimed_job(parts)
    status, _ = await journaling_runner(parts, Journaling()).run(claimed)
    assert status == JobStatus.SUCCEEDED and separately == []  # no transaction of its own
    record = await parts.db.get_request(claimed.id)
    (task,) = await parts.db.tasks_for(claimed.id)
    assert record is not None and (task.task_id, task.state) == ("upstream-1", "done")
    assert task.output_blob_ids == record.output_blob_ids  # the stored result is the answer, stored once


async def test_a_job_handed_back_at_shutdown_records_its_ended_tasks_first(parts: Parts) -> None:
    provider = Journaling(hold=asyncio.Event())
    runner = journaling_runner(parts, provider)
    claimed = await claimed_job(parts)
    running = asyncio.create_task(runner.run(claimed))
    await asyncio.wait_for(provider.ended.wait(), 60)
    (task,) = await parts.db.tasks_for(claimed.id)
    assert task.state == "submitted"  # ended, to be recorded with the job's end
    runner.stopping(claimed.id, "shutdown")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    (task,) = await parts.db.tasks_for(claimed.id)
    record = await parts.db.get_request(claimed.id)
    assert task.state == "done" and len(task.output_blob_ids) == 1  # the next run takes its image from here
    assert record is not None and record.status == JobStatus.PROCESSING  # handed back, not ended


async def test_results_are_let_out_of_the_page_cache_and_inputs_kept(parts: Parts, tmp_path: Path) -> None:
    """A result linked to (a URL, fetched once at most) is let out of the page cache once durable, whether
    the runner stores it or the job's journal does. An input, read back when its job runs, and a result
    whose answer reads it back at once (b64_json, or a stream's events), stay cached."""
    skip_unless_pages_can_be_dropped(tmp_path)
    photo = noise_png(256, 256)  # pixels that do not compress: the file is several pages
    rid = await image_service(parts, Queue()).submit(
        image_call("edit", {"model": "kontext-tiny", "prompt": "make it red"}, [ImageSource("image", data=photo)]),
        base_url="http://gw.test/",
    )
    claimed = await parts.db.claim_next("test-worker", 30, Lane.LOCAL)
    assert claimed is not None and claimed.id == rid
    (input_id,) = claimed.params["input_blob_ids"]
    runner = painting_runner(parts)
    assert (await runner.run(claimed))[0] == JobStatus.SUCCEEDED
    journaled = await claimed_job(parts)
    assert (await journaling_runner(parts, Journaling()).run(journaled))[0] == JobStatus.SUCCEEDED
    inline = await claimed_job(parts, response_format="b64_json", size="512x512")  # bytes of its own
    assert (await journaling_runner(parts, Journaling()).run(inline))[0] == JobStatus.SUCCEEDED
    streamed = await claimed_job(parts, stream=True, size="256x256")  # its events carry the bytes too
    assert (await journaling_runner(parts, Journaling()).run(streamed))[0] == JobStatus.SUCCEEDED

    def cached(blob_id: str) -> tuple[int, int]:
        path = parts.blobs.path(blob_id)
        assert path is not None
        return cached_pages(path)

    kept, pages = cached(input_id)
    assert pages > 10 and kept == pages
    for job_id in (inline.id, streamed.id):
        record = await parts.db.get_request(job_id)
        assert record is not None and record.output_blob_ids
        for blob_id in record.output_blob_ids:
            kept, pages = cached(blob_id)
            assert pages >= 1 and kept == pages
    for job_id in (rid, journaled.id):
        record = await parts.db.get_request(job_id)
        assert record is not None and record.output_blob_ids
        for blob_id in record.output_blob_ids:
            assert cached(blob_id)[0] == 0
            assert open_image(await parts.blobs.get(blob_id) or b"").format == "PNG"  # whole, read from disk
