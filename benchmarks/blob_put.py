"""What storing one result costs in the local blob store, by how the call reaches its thread: CPU-ms per put.

A put hashes the bytes (sha256: the blob's id), writes them aside, fsyncs and renames them into place.
Three ways, in this process (uvloop), each on a fresh store in a temp dir, every put new bytes (so none
is found already stored), rounds interleaved, medians:

  the store                   `LocalBlobStore.put`: the work on the store's own two file threads
                              (`ThreadQueue`), what the gateway runs
  asyncio.to_thread           the same blocking work (`LocalBlobStore._put`) through the loop's
                              default executor, as the store did before
  on the loop                 the same work with no hop at all (the floor; blocks the loop)

CPU is the whole process's (both threads); "loop thread" is the event loop's own share, what a busy
gateway's one loop pays.

    .venv/bin/python benchmarks/blob_put.py                      # ~0.15 MB (JPEG-sized) and ~1.7 MB (PNG-sized)
    .venv/bin/python benchmarks/blob_put.py --puts 400 --at-once 1 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kontext_gateway.store.blobs import LocalBlobStore

Put = Callable[[LocalBlobStore, bytes], Awaitable[str]]


async def via_store(store: LocalBlobStore, data: bytes) -> str:
    return await store.put(data, ext="jpg")


async def via_to_thread(store: LocalBlobStore, data: bytes) -> str:
    return await asyncio.to_thread(store._put, data, "jpg", True)


async def on_the_loop(store: LocalBlobStore, data: bytes) -> str:
    return store._put(data, "jpg", True)


WAYS: dict[str, Put] = {"the store": via_store, "asyncio.to_thread": via_to_thread, "on the loop": on_the_loop}


async def measure(put: Put, size: int, puts: int, at_once: int) -> tuple[float, float]:
    """(process CPU-ms per put, loop-thread CPU-ms per put)."""
    base = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="kontext-blob-bench-") as tmp:
        store = LocalBlobStore(Path(tmp))
        counter = iter(range(puts + 2 * at_once))

        async def lane(n: int) -> None:
            for _ in range(n):
                await put(store, next(counter).to_bytes(8, "big") + base)  # new bytes each time

        await asyncio.gather(*(lane(2) for _ in range(at_once)))  # warm up: threads started, folders made
        cpu0, loop0 = time.process_time(), time.thread_time()
        await asyncio.gather(*(lane(puts // at_once) for _ in range(at_once)))
        done = puts // at_once * at_once
        return (time.process_time() - cpu0) / done * 1000, (time.thread_time() - loop0) / done * 1000


async def run(sizes: list[int], puts: int, at_once: list[int], repeats: int) -> None:
    print("| bytes | puts at once | way | CPU-ms / put | loop thread CPU-ms / put | rounds (CPU) |")
    print("|---:|---:|---|---:|---:|---|")
    for size in sizes:
        for n in at_once:
            rows: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
            for _ in range(repeats):
                for name, way in WAYS.items():
                    rows[name].append(await measure(way, size, puts, n))
            for name, values in rows.items():
                cpu = statistics.median(v[0] for v in values)
                loop = statistics.median(v[1] for v in values)
                rounds = ", ".join(f"{v[0]:.3f}" for v in values)
                print(f"| {size:,} | {n} | {name} | {cpu:.3f} | {loop:.3f} | {rounds} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[150_000, 1_700_000], help="bytes per put")
    ap.add_argument("--puts", type=int, default=400, help="puts measured per way and round (default 400)")
    ap.add_argument("--at-once", type=int, nargs="+", default=[1, 16], help="puts in flight (default 1 16)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds, interleaved (default 5)")
    args = ap.parse_args()
    uvloop.run(run(args.sizes, args.puts, args.at_once, args.repeats))


if __name__ == "__main__":
    main()
