"""Shared parts of the fake upstreams: fault injection, result files, loopback serving.

Each fake (replicate.py, fal.py, fireworks.py, bfl.py) is a Starlette app faithful to its provider's
documented protocol, stateful (a task is pending for a few polls,
then ready), serving its results from expiring URLs on itself. Tests switch it into misbehaviour
through `fake.faults`:

    fake.faults.add("429", at="submit", retry_after=1)     # the next submit answers 429 once
    fake.faults.add("500", at="poll", times=2)             # the next two polls answer 500
    fake.faults.add("moderation", at="poll")                # the task ends moderated
    fake.faults.always("503", at="submit")                  # down until fake.faults.clear()
    fake.faults.randomly(0.5, ["500", "drop", "malformed"], seed=7)  # for soak tests

Fault kinds: "401", "402", "429", "500", "502", "503" (HTTP errors with the provider's error body),
"slow" (sleep `delay` seconds first), "drop" (start the response, then cut the connection),
"malformed" (200 with a body that is not JSON), "moderation" (the provider's own moderation signal),
"task_error" (the task ends in the provider's failed state), "result_404" (the result URL 404s),
"not_image" (the result URL serves bytes that are not an image), "redirect" (a 302 to the same path
and query on `location`, another host), "foreign_url" (at submit: the URLs the provider returns for
the task, BFL's polling_url, fal's status/response/cancel URLs, Replicate's urls, name `location`
instead of the fake). Points (`at=`): "submit", "poll", "result" (fal's response_url), "download", or
"any". `Elsewhere` is that other host: it records what reaches it, headers included.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

HTTP_FAULTS = {"401", "402", "429", "500", "502", "503"}


@dataclass
class Fault:
    kind: str
    at: str = "any"
    times: int | None = 1  # None: until cleared
    retry_after: float | None = None
    delay: float = 5.0
    location: str | None = None  # "redirect" / "foreign_url": the other host's base URL


@dataclass
class Faults:
    rules: list[Fault] = field(default_factory=list)
    random_rate: float = 0.0
    random_kinds: list[str] = field(default_factory=list)
    random_points: tuple[str, ...] = ("submit", "poll")
    _rng: random.Random = field(default_factory=random.Random)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    fired: list[tuple[str, str]] = field(default_factory=list)  # (kind, point) of every fault used

    def add(self, kind: str, *, at: str = "any", times: int | None = 1, **kw: Any) -> None:
        with self._lock:
            self.rules.append(Fault(kind, at, times, **kw))

    def always(self, kind: str, *, at: str = "any", **kw: Any) -> None:
        self.add(kind, at=at, times=None, **kw)

    def randomly(
        self, rate: float, kinds: list[str], *, seed: int = 0, points: tuple[str, ...] = ("submit", "poll")
    ) -> None:
        with self._lock:
            self.random_rate, self.random_kinds, self.random_points = rate, list(kinds), points
            self._rng.seed(seed)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.random_rate = 0.0

    def take(self, point: str) -> Fault | None:
        """The fault to apply at this point now, if any (consumes one use of it)."""
        with self._lock:
            for rule in self.rules:
                if rule.at in (point, "any"):
                    if rule.times is not None:
                        rule.times -= 1
                        if rule.times <= 0:
                            self.rules.remove(rule)
                    self.fired.append((rule.kind, point))
                    return rule
            if self.random_rate and point in self.random_points and self._rng.random() < self.random_rate:
                kind = self._rng.choice(self.random_kinds)
                self.fired.append((kind, point))
                return Fault(kind, point, retry_after=0.05 if kind == "429" else None, delay=2.0)
        return None


async def record(requests: list, request: Request, *, with_query: bool = False) -> Any:
    """Append (method, path, headers, JSON body or raw bytes) to a fake's log; return the body."""
    body: Any = None
    raw = await request.body()
    if raw:
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
    path = request.url.path + (f"?{request.url.query}" if with_query and request.url.query else "")
    requests.append((request.method, path, dict(request.headers), body))
    return body


class DropConnection(Exception):
    """Raised after a partial response: uvicorn cuts the connection, the client sees it dropped."""


async def http_fault(fault: Fault, send_error: Any, request: Request | None = None) -> Response | None:
    """Apply a transport-level fault. Returns a response to send instead, or None to carry on."""
    if fault.kind == "redirect" and request is not None and fault.location:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{fault.location.rstrip('/')}{request.url.path}{query}", status_code=302)
    if fault.kind == "slow":
        await asyncio.sleep(fault.delay)
        return None
    if fault.kind in HTTP_FAULTS:
        headers = {"retry-after": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        return send_error(int(fault.kind), headers)
    if fault.kind == "malformed":
        return Response(b'{"status": "Ready", "result": {"sample": ', status_code=200, media_type="application/json")
    if fault.kind == "drop":
        return _DroppingResponse()
    return None


class _DroppingResponse(Response):
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"500")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"partial": ', "more_body": True})
        raise DropConnection()


# -- results served by the fake itself, from expiring URLs ----------------------------------------------

# Kontext's ~1 MP output buckets (BFL / Runware), by aspect ratio; others computed at ~1 MP.
BUCKETS = {
    "21:9": (1568, 672),
    "16:9": (1392, 752),
    "4:3": (1184, 880),
    "3:2": (1248, 832),
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:4": (880, 1184),
    "9:16": (752, 1392),
    "9:21": (672, 1568),
}


def bucket(ratio: str | None, default: tuple[int, int] = (1024, 1024)) -> tuple[int, int]:
    if not ratio or (ratio not in BUCKETS and ":" not in ratio):
        return default
    if ratio in BUCKETS:
        return BUCKETS[ratio]
    a, b = (float(x) for x in ratio.split(":"))
    r = a / b
    h = int((1024 * 1024 / r) ** 0.5) // 16 * 16
    return int(h * r) // 16 * 16, h


def output_size(ratio: str | None, scale: float, default: tuple[int, int] = (1024, 1024)) -> tuple[int, int]:
    """The size a fake draws for a ratio: Kontext's ~1 MP bucket, scaled down (as ResultStore does)."""
    w, h = bucket(ratio, default)
    return max(16, int(w * scale) // 16 * 16), max(16, int(h * scale) // 16 * 16)


PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def make_image(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    """A real picture (a gradient tinted by the seed) in the given format."""
    rng = random.Random(seed)
    tint = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    small = Image.new("RGB", (16, 16))
    for x in range(16):
        for y in range(16):
            small.putpixel((x, y), ((tint[0] + x * 16) % 256, (tint[1] + y * 16) % 256, tint[2]))
    img = small.resize((width, height))
    buf = io.BytesIO()
    img.save(buf, PIL_FORMATS[fmt])
    return buf.getvalue()


@dataclass
class ResultStore:
    """Files a fake hands out by URL; each URL expires `ttl` seconds after it was made."""

    ttl: float = 600.0
    scale: float = 0.25  # fakes draw ~1 MP buckets scaled down, to keep tests fast
    files: dict[str, tuple[bytes, str, float]] = field(default_factory=dict)

    def add(self, base_url: str, data: bytes, content_type: str, ext: str) -> str:
        token = uuid.uuid4().hex
        self.files[token] = (data, content_type, time.time() + self.ttl)
        return f"{base_url}/results/{token}.{ext}"

    def image_url(
        self, base_url: str, ratio: str | None, fmt: str, seed: int = 0, default: tuple[int, int] = (1024, 1024)
    ) -> tuple[str, tuple[int, int]]:
        w, h = output_size(ratio, self.scale, default)
        ext = "jpg" if fmt in ("jpeg", "jpg") else fmt
        data = make_image(w, h, fmt, seed)
        return self.add(base_url, data, f"image/{'jpeg' if ext == 'jpg' else ext}", ext), (w, h)

    async def serve(self, request: Request, faults: Faults) -> Response:
        fault = faults.take("download")
        if fault is not None:
            if fault.kind == "result_404":
                return JSONResponse({"detail": "Not found"}, status_code=404)
            if fault.kind == "not_image":
                return Response(b"<html>this is not an image</html>", media_type="image/png")
            replacement = await http_fault(fault, lambda s, h: JSONResponse({"detail": "error"}, s, headers=h), request)
            if replacement is not None:
                return replacement
        token = request.path_params["name"].split(".")[0]
        item = self.files.get(token)
        if item is None or item[2] < time.time():
            return JSONResponse({"detail": "Not found or expired"}, status_code=404)
        return Response(item[0], media_type=item[1])


class Elsewhere:
    """Another host: a server that is none of the providers' (an attacker's, or a CDN). It records
    every request that reaches it, headers included, and serves `results` files at /results/{name},
    as the CDN a result URL redirects to would; anything else answers 404."""

    def __init__(self, results: ResultStore | None = None) -> None:
        self.results = results or ResultStore()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []  # (method, path?query, headers, body)
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        self.app = Starlette(
            routes=[
                Route("/results/{name}", self._result, methods=["GET"]),
                Route("/{path:path}", self._other, methods=methods),
            ]
        )

    def headers_seen(self) -> list[dict[str, str]]:
        return [headers for _, _, headers, _ in self.requests]

    async def _result(self, request: Request) -> Response:
        await record(self.requests, request, with_query=True)
        return await self.results.serve(request, Faults())

    async def _other(self, request: Request) -> Response:
        await record(self.requests, request, with_query=True)
        return JSONResponse({"detail": "Not Found"}, status_code=404)


# -- serving an ASGI app on loopback ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn on a free loopback port in a thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
