"""In-process channels between whoever waits on a job and the runner that runs it, keyed by request id.

- completion: an event set when the job ends (registered before the job is enqueued, so its end
  cannot be missed), with the job's final record beside it (the runner has it from the statement
  that ended the job: the waiter needs no second read). A waiter in another process than the
  runner's is told by the database's notice on PostgreSQL (store/notices.py), or by the watch on a
  SQLite file (store/sqlite_watch.py), and reads the record; otherwise it polls.
- progress: a listener told of each denoising step (the CLI's progress bar).
- previews: where a streaming request wants the job's previews (`stream: true`).
- steps: (step, total) of the jobs this process runs on the local engine (the playground shows it).

Everything here is in memory and per process; an entry is removed when its waiter stops waiting, so
nothing stays behind for jobs nobody waits on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..providers.base import ProgressFn
from ..store.records import RequestRow

if TYPE_CHECKING:
    from PIL.Image import Image

Preview = Callable[[int, "Image"], None]  # (index 0.., a decoded picture at output size), from the engine's thread


class JobChannels:
    def __init__(self) -> None:
        self._completions: dict[str, asyncio.Event] = {}
        self.someone_waits = asyncio.Event()  # set each time a waiter registers (a watch wakes for it)
        self._finals: dict[str, RequestRow] = {}
        self.progress: dict[str, ProgressFn] = {}
        self.previews: dict[str, Preview] = {}
        self.steps: dict[str, tuple[int, int]] = {}

    def completion(self, request_id: str) -> asyncio.Event:
        """The event set when the job ends (made on first ask)."""
        event = self._completions.get(request_id)
        if event is None:
            event = self._completions[request_id] = asyncio.Event()
            self.someone_waits.set()
        return event

    def waited(self) -> list[str]:
        """The ids of the jobs someone waits on."""
        return list(self._completions)

    def done(self, request_id: str, final: RequestRow | None = None) -> None:
        """The job ended (as `final`, when known). Only jobs someone waits on have an event, and the
        waiter holds it, so it can go now."""
        event = self._completions.pop(request_id, None)
        if event is not None:
            if final is not None:
                self._finals[request_id] = final
            event.set()

    def final(self, request_id: str) -> RequestRow | None:
        """The ended job's record, handed over once (None: read it from the database)."""
        return self._finals.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        """The waiter stopped waiting: drop its completion event, final record and progress listener."""
        self._completions.pop(request_id, None)
        self._finals.pop(request_id, None)
        self.progress.pop(request_id, None)

    def step(self, request_id: str) -> ProgressFn:
        """The progress function a job runs with: records its steps, and tells its listener if any."""
        listener = self.progress.get(request_id)

        def progress(step: int, total: int) -> None:  # called from the engine's thread: plain assignments
            self.steps[request_id] = (step, total)
            if listener is not None:
                listener(step, total)

        return progress
