"""The durable TaskJournal: upstream tasks in the `upstream_tasks` table, their images as blobs."""

from __future__ import annotations

import asyncio
import dataclasses

from ..imaging import EXTENSIONS, inspect_image
from ..params import Size
from ..providers.base import ProviderImage
from ..providers.calls import Task
from ..store.blobs import BlobStore
from ..store.db import Database
from ..store.records import TaskRow


class DurableJournal:
    def __init__(self, db: Database, blobs: BlobStore, request_id: str, rows: list[TaskRow], max_pixels: int) -> None:
        self.db = db
        self.blobs = blobs
        self.request_id = request_id
        self.max_pixels = max_pixels
        # The latest task per (slot, entry) from earlier runs of this job.
        self._latest: dict[tuple[int, str], TaskRow] = {}
        for row in rows:
            self._latest[(row.slot, row.config_key)] = row

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
        row = await self.db.record_task(self.request_id, slot=slot, config_key=config_key, task_id=task.id, data=data)
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
        return row

    async def finished(self, row: int, *, images: list[ProviderImage] | None) -> None:
        kept = [img for img in images or [] if img.data is not None and img.format in EXTENSIONS]
        await asyncio.gather(*map(self._keep, kept))
        blob_ids = [img.blob_id for img in kept if img.blob_id is not None]
        state = "done" if images is not None else "failed"
        await self.db.finish_task(row, state=state, output_blob_ids=blob_ids)
        for key, latest in self._latest.items():
            if latest.id == row:
                self._latest[key] = dataclasses.replace(latest, state=state, output_blob_ids=blob_ids)

    async def _keep(self, img: ProviderImage) -> None:
        """Store a result as it came, noting where: the runner passes it on without storing it again."""
        assert img.data is not None and img.format is not None
        img.blob_id = await self.blobs.put(img.data, ext=EXTENSIONS[img.format])


def _task(row: TaskRow) -> Task:
    data = row.data or {}
    return Task(id=row.task_id, data=dict(data.get("data") or {}), outputs=data.get("outputs"))
