"""The durable TaskJournal: upstream tasks in the `upstream_tasks` table, their images as blobs.

A task is committed when it is submitted, before anyone waits on it: a job run again after a crash
polls it instead of paying for it twice. How it ended is recorded with the job's next write, in the
same transaction: its end (the usual case: the last task of a job ends, and the job ends at once), or
the next task's submit. While another task of the job is still upstream, an end is recorded at once:
that wait may be long. A crash before an end is recorded costs a poll and a download again, never a
new task, and its stored images (content-addressed) are found under the same blob ids.
"""

from __future__ import annotations

import asyncio
import dataclasses

from ..imaging import EXTENSIONS, inspect_image
from ..params import Size
from ..providers.base import ProviderImage
from ..providers.calls import Task
from ..store.blobs import BlobStore
from ..store.db import Database
from ..store.records import TaskEnd, TaskRow


class DurableJournal:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        request_id: str,
        rows: list[TaskRow],
        max_pixels: int,
        *,
        read_back: bool = False,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.read_back = read_back  # whether the job's answer reads its results' bytes at once (b64_json)
        self.request_id = request_id
        self.max_pixels = max_pixels
        # The latest task per (slot, entry) from earlier runs of this job.
        self._latest: dict[tuple[int, str], TaskRow] = {}
        for row in rows:
            self._latest[(row.slot, row.config_key)] = row
        self._unrecorded: list[TaskEnd] = []  # ends that go with the job's next write
        self._recording = 0  # submits being recorded: tasks upstream that _latest does not show yet

    @classmethod
    async def load(cls, db: Database, blobs: BlobStore, request_id: str, max_pixels: int) -> DurableJournal:
        return cls(db, blobs, request_id, await db.tasks_for(request_id), max_pixels)

    def submitted_tasks(self) -> list[tuple[str, Task]]:
        """(config_key, Task) of every task still running upstream: to cancel them if asked."""
        return [(row.config_key, _task(row)) for row in self._latest.values() if row.state == "submitted"]

    def resumable(self, slot: int, config_key: str) -> tuple[int, Task] | None:
        row = self._latest.get((slot, config_key))
        if row is None or row.state != "submitted":
            return None
        return row.id, _task(row)

    async def finished_images(self, slot: int, config_key: str) -> list[ProviderImage] | None:
        row = self._latest.get((slot, config_key))
        if row is None or row.state != "done" or not row.output_blob_ids:
            return None
        images = []
        for blob_id, data in zip(
            row.output_blob_ids, await asyncio.gather(*map(self.blobs.get, row.output_blob_ids)), strict=True
        ):
            if data is None:
                return None  # the stored result is gone: run the task again
            fmt, size = inspect_image(data, param="output", max_pixels=self.max_pixels)
            images.append(ProviderImage(data=data, format=fmt, size=Size(*size), blob_id=blob_id))
        return images

    async def submitted(self, slot: int, config_key: str, task: Task) -> int:
        data = {"data": task.data, "outputs": task.outputs}
        ended = self.take_unrecorded()
        self._recording += 1
        try:
            row = await self.db.record_task(
                self.request_id, slot=slot, config_key=config_key, task_id=task.id, data=data, ended_tasks=ended
            )
        except BaseException:
            self._unrecorded[:0] = ended  # not written: still for the job's next write
            raise
        finally:
            self._recording -= 1
        self._latest[(slot, config_key)] = TaskRow(
            id=row,
            request_id=self.request_id,
            slot=slot,
            config_key=config_key,
            task_id=task.id,
            data=data,
            state="submitted",
            output_blob_ids=[],
        )
        if self._unrecorded:  # ended while this submit was being recorded, and this task is upstream now
            await self.record_unrecorded()
        return row

    async def finished(self, row: int, *, images: list[ProviderImage] | None) -> None:
        """The task ended (`images` None: it failed); its images are stored now, its end is recorded
        with the job's next write, or now if another of its tasks is still upstream."""
        kept = [img for img in images or [] if img.data is not None and img.format in EXTENSIONS]
        await asyncio.gather(*map(self._keep, kept))
        blob_ids = [img.blob_id for img in kept if img.blob_id is not None]
        state = "done" if images is not None else "failed"
        for key, latest in self._latest.items():
            if latest.id == row:
                self._latest[key] = dataclasses.replace(latest, state=state, output_blob_ids=blob_ids)
        self._unrecorded.append(TaskEnd(row, state, blob_ids))
        if self._recording or any(latest.state == "submitted" for latest in self._latest.values()):
            await self.record_unrecorded()

    def take_unrecorded(self) -> list[TaskEnd]:
        """The task ends not recorded yet, for the job's next write to commit with its own (once
        taken, they are the caller's to write)."""
        ended, self._unrecorded = self._unrecorded, []
        return ended

    async def record_unrecorded(self) -> None:
        """Record now the task ends not recorded yet (in a transaction of their own)."""
        ended = self.take_unrecorded()
        if not ended:
            return
        try:
            await self.db.finish_tasks(ended)
        except BaseException:
            self._unrecorded[:0] = ended
            raise

    async def _keep(self, img: ProviderImage) -> None:
        """Store a result as it came, noting where: the runner passes it on without storing it again."""
        assert img.data is not None and img.format is not None
        img.blob_id = await self.blobs.put(img.data, ext=EXTENSIONS[img.format], cached=self.read_back)


def _task(row: TaskRow) -> Task:
    data = row.data or {}
    return Task(id=row.task_id, data=dict(data.get("data") or {}), outputs=data.get("outputs"))
