"""What a result's file costs as the kernel's page cache grows: kept cached, or its pages dropped once
durable (`LocalBlobStore.put(..., cached=False)`), and what reading it back then costs.

Each way writes `--gib` GiB of new results (`--size` bytes each, new bytes every time) into a fresh
store through `LocalBlobStore._put` on this thread (hash, write aside, fsync, rename: what a put does on
the store's file thread), and prints the CPU-ms per put for each block of `--block` puts in turn. Kept
cached, every file takes memory the page cache did not hold before; once that is memory the kernel has
not touched yet (or has handed back to a VM's host), the write's copy into it costs several times
more, and the blocks show the step. Dropped, the next file reuses the pages the last one let go.
Then the last block's files are read back (as a `b64_json` answer or a URL fetch reads a result):
from the disk where dropped, from memory where kept.

The dropped way runs first, so that it cannot reuse pages the kept way let go; the kept way's store is
deleted at the end, and its memory with it.

    .venv/bin/python benchmarks/page_cache.py                      # 1.7 MB results, 3 GiB per way
    .venv/bin/python benchmarks/page_cache.py --size 150000 --gib 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kontext_gateway.store.blobs import LocalBlobStore


def meminfo() -> str:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    gib = {k: int(fields[k].split()[0]) / 2**20 for k in ("MemFree", "Cached")}
    return f"free {gib['MemFree']:.1f} GiB, page cache {gib['Cached']:.1f} GiB"


def one_way(root: Path, cached: bool, size: int, total: int, block: int) -> tuple[list[float], float]:
    """(CPU-ms per put of each block, CPU-ms per read of the last block's files)."""
    store = LocalBlobStore(root)
    base, ids, blocks = os.urandom(size), [], []
    n = 0
    while n < total:
        cpu0 = time.process_time()
        ids = [store._put(i.to_bytes(8, "big") + base, "png", cached) for i in range(n, n + block)]
        blocks.append((time.process_time() - cpu0) / block * 1000)
        n += block
    cpu0 = time.process_time()
    for blob_id in ids:
        path = store.path(blob_id)
        assert path is not None
        path.read_bytes()
    return blocks, (time.process_time() - cpu0) / len(ids) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1_660_000, help="bytes per result (default 1,660,000: a 1024² PNG)")
    ap.add_argument("--gib", type=float, default=3.0, help="GiB written per way (default 3)")
    ap.add_argument("--block", type=int, default=300, help="puts per block (default 300)")
    args = ap.parse_args()
    total = int(args.gib * 2**30 / args.size) // args.block * args.block
    print(f"{total} puts of {args.size:,} bytes per way, blocks of {args.block}; before: {meminfo()}")
    print("| way | CPU-ms per put, block by block | median | last block read back, CPU-ms per file |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="kontext-page-cache-") as tmp:
        for name, cached in (("dropped once durable", False), ("kept cached", True)):
            blocks, read = one_way(Path(tmp) / name.split()[0], cached, args.size, total, args.block)
            shown = ", ".join(f"{b:.2f}" for b in blocks)
            print(f"| {name} | {shown} | {statistics.median(blocks):.2f} | {read:.3f} |", flush=True)
        print(f"\nafter both: {meminfo()}")


if __name__ == "__main__":
    main()
