"""Requests the server cuts off as it stops.

On SIGTERM a process drains: it takes no more jobs, and requests still open have the drain timeout to
be answered. Then uvicorn cancels those still waiting, and answers a cancelled request with a bare
500. A route that waits on a job answers that cancellation itself instead (the images API: a 503
naming the request; a prediction: as it stands), and the job is handed back to the queue, not
canceled (ImageService.wait cancels none while the process drains).
"""

from __future__ import annotations

import asyncio


def answering_stop(draining: bool) -> bool:
    """For a route that caught CancelledError: True when it is the server's stop (this process drains;
    a client that hangs up is heard otherwise) and the route is to answer it: the task's cancellation
    is then taken back (asyncio.timeout and task groups count them). False: let it through."""
    if not draining:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True
