"""In-process cost of one request through the whole ASGI app (middlewares, routing, handler), no sockets.

Usage: .venv/bin/python benchmarks/asgi_overhead.py [--path /v1/models] [-n 5000] [--profile]
Prints µs per request after a warm-up; --profile adds a cProfile listing (cumulative).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time

from kontext_gateway.api.app import create_app
from kontext_gateway.config import Settings


async def main(path: str, n: int, profile: bool) -> None:
    app = create_app(Settings(data_dir=tempfile.mkdtemp(prefix="kontext-asgi-"), workers=0))
    async with app.router.lifespan_context(app):
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"127.0.0.1:8000")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "app": app,
        }

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            pass

        for _ in range(500):
            await app(dict(scope), receive, send)
        t0 = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        print(f"GET {path}: {(time.perf_counter() - t0) / n * 1e6:.1f} µs per request ({n} requests)")
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                await app(dict(scope), receive, send)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="/v1/models")
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.path, args.n, args.profile))
