"""What one upstream result's bytes cost the gateway, piece by piece: CPU-ms per image.

Every hosted request ends with a result image that the gateway checks, stores and records. This
measures, in this process, the pieces that grow with the image's size, for the two results
gateway_vs_litellm.py serves (a 1024x1024 photo-like picture: ~1.7 MB as PNG, ~0.15 MB as BFL's
default JPEG), each piece on fresh bytes (a comment chunk makes every copy unique, as upstream results
are):

  check         `inspect_image`: format from the magic bytes, size from the header, the file whole
                (every PNG chunk's CRC up to IEND; JPEG's end marker), no pixel decoded
  store         `LocalBlobStore._put`: sha256 for the content address, write to a temp file, fsync,
                rename (what the journal does with a result, on a worker thread)
  joining       the download's chunks joined into one bytes object (64 KiB chunks)

and beside them the floors, the same work done by the standard library alone: `hashlib.sha256`,
`zlib.crc32` over the whole file, a plain `write` of the bytes, and that write with `fsync`. The
download itself (TLS and HTTP) is measured by upstream_client.py; the pieces here come on top of it.

    .venv/bin/python benchmarks/result_bytes.py
    .venv/bin/python benchmarks/result_bytes.py --n 200 --repeats 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from fast_upstream import encode, photo_like, tagged
from kontext_gateway.imaging import inspect_image
from kontext_gateway.store.blobs import LocalBlobStore

MAX_PIXELS = 2**24


def cpu_ms(piece: Callable[[bytes], object], images: list[bytes]) -> float:
    """CPU-ms per image of `piece` over `images` (this process, every thread)."""
    t0 = time.process_time()
    for data in images:
        piece(data)
    return (time.process_time() - t0) / len(images) * 1000


def pieces(folder: Path, ext: str) -> dict[str, Callable[[bytes], object]]:
    store = LocalBlobStore(folder / "blobs")
    plain = folder / "plain"
    plain.mkdir()
    count = iter(range(10**9))

    def write(data: bytes, sync: bool = False) -> None:
        with open(plain / str(next(count)), "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())

    def joined(data: bytes) -> bytes:
        return b"".join([data[i : i + 65536] for i in range(0, len(data), 65536)])

    return {
        "check (inspect_image)": lambda data: inspect_image(data, param="output", max_pixels=MAX_PIXELS),
        "store (LocalBlobStore._put)": lambda data: store._put(data, ext, True),
        "joining the download's chunks": joined,
        "floor: hashlib.sha256": lambda data: hashlib.sha256(data).digest(),
        "floor: zlib.crc32 of the whole file": zlib.crc32,
        "floor: write": write,
        "floor: write + fsync": lambda data: write(data, sync=True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="images per piece and round (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, interleaved; medians (default 3)")
    args = ap.parse_args()

    picture = photo_like()
    print("| result | bytes | piece | CPU-ms per image | rounds |")
    print("|---|---:|---|---:|---|")
    for fmt in ("png", "jpeg"):
        base = encode(picture, fmt)
        with tempfile.TemporaryDirectory(prefix="kontext-result-bytes-") as tmp:
            ways = pieces(Path(tmp), "jpg" if fmt == "jpeg" else fmt)
            rounds: dict[str, list[float]] = {name: [] for name in ways}
            for r in range(args.repeats):
                for name, piece in ways.items():
                    images = [tagged(base, fmt, f"{name} {r} {i}") for i in range(args.n)]
                    rounds[name].append(cpu_ms(piece, images))
        for name, values in rounds.items():
            median = statistics.median(values)
            print(f"| {fmt} | {len(base)} | {name} | {median:.3f} | {', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
