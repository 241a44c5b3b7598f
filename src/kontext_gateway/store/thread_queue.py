"""Blocking calls run by a few threads of their own, fed from one queue: one hop from the event loop each.

`loop.run_in_executor` (and `asyncio.to_thread`) wraps each call in a concurrent.futures future, a
work item and callbacks chaining that future to an asyncio one, and takes the executor's locks on the
way: about as much CPU again as the hop itself (`benchmarks/sqlite_transaction.py`,
`benchmarks/blob_put.py`). Here a thread takes the call off a queue and settles the caller's asyncio
future from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# What a thread reads: a call and the future that waits for it, or None to stop.
_Call = tuple["asyncio.Future[Any]", Callable[[], Any]]


class ThreadQueue:
    """Up to `threads` threads (daemons: an idle one never holds up the interpreter's exit), started
    as calls arrive while none waits for one. With `idle_s`, a thread that waited that long for a call
    ends (a later call starts another); without, threads live until `close()`."""

    def __init__(self, name: str, *, threads: int = 1, idle_s: float | None = None) -> None:
        self._name = name
        self._max_threads = threads
        self._idle_s = idle_s
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the two below; a call is queued under it too
        self._threads: set[threading.Thread] = set()
        # Threads waiting for a call (or about to) less the calls queued and not yet taken: below zero,
        # a queued call has no thread free for it. (Counting only the waiting threads, a thread that
        # had not yet taken the call before it counted as free for the next one, which then waited.)
        self._spare = 0

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        """The threads alive now."""
        with self._lock:
            return tuple(self._threads)

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """`fn()` on one of the threads; its result (or exception) on the returned future. A caller
        that stops waiting before a thread reaches its call leaves `fn` unrun."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._calls.put((future, fn))
            self._spare -= 1
            if self._spare < 0 and len(self._threads) < self._max_threads:
                self._spare += 1  # the new thread, waiting from its start
                thread = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.add(thread)
                thread.start()
        return future

    async def close(self) -> None:
        """End the threads once the calls already queued are done."""
        with self._lock:
            threads = list(self._threads)
            for _ in threads:
                self._calls.put(None)
        if threads:
            await asyncio.to_thread(_join, threads)

    def _serve(self) -> None:
        """Counted as waiting from its start; taking a call settles one queued call against it, and it
        counts as waiting again once the call is done."""
        me = threading.current_thread()
        while True:
            try:
                call = self._calls.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if self._calls.empty():  # nothing came meanwhile: callers queue under this lock
                        self._spare -= 1
                        self._threads.discard(me)
                        return
                continue
            if call is None:
                with self._lock:
                    self._spare -= 1
                    self._threads.discard(me)
                return
            future, fn = call
            # read across threads: at worst a call cancelled just now still runs
            if not future.cancelled():
                try:
                    result, error = fn(), None
                except BaseException as exc:  # whatever it is, it is the caller's to see
                    result, error = None, exc
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                    future.get_loop().call_soon_threadsafe(_settle, future, result, error)
            with self._lock:
                self._spare += 1


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the loop: hand the thread's answer to the caller, unless it stopped waiting."""
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
