"""Background tasks a component starts with itself and stops with itself (the database's notices, the
SQLite watch, the retention sweep, the webhook sweep)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and return once it has ended (None: nothing was started)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
