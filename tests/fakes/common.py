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
"malformed" (200 with a body that is not JSON), "huge" (200 with a JSON body of 17 MiB, over
what the gateway reads of an answer), "moderation" (the provider's own moderation signal),
"task_error" (the task ends in the provider's failed state), "result_404" (the result URL 404s),
"not_image" (the result URL serves bytes that are not an image), "redirect" (a 302 to the same path
and query on `location`, another host), "foreign_url" (at submit: the URLs the provider returns for
the task, BFL's polling_url, fal's status/response/cancel URLs, Replicate's urls, name `location`
instead of the fake). Points (`at=`): "submit", "poll", "result" (fal's response_url), "download", or
"any". `Elsewhere` is that other host: it records what reaches it, headers included. Moderation can be
told which documented signal to give: `variant=` (Replicate's error wording, fal's 422 or
has_nsfw_concepts, BFL's status) and `reasons=` (BFL's "Moderation Reasons", fal's `categories`); each
fake's docstring lists its variants.

Strictness, shared by all four: every request body is checked against its route's published schema
(kontext_gateway.providers.contracts, closed: an unknown field is refused) and answered with the
provider's own error body; each refusal is kept in `fake.refused` (`Refusal`: route key, status, the
problems). Every request's body size is kept in `fake.received` (`Received`: method, path, host, bytes),
and files uploaded to a provider's storage in `fake.uploads` (`Upload`). A fake whose API spans more
than one host (BFL's polling cluster, fal's storage) serves the others as `Annex`es on other loopback
hosts and ports, started and stopped with its app; `fake.other_origins` are the ones that take the key,
for the gateway's `provider_hosts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from kontext_gateway.providers.contracts import Problem

HTTP_FAULTS = {"401", "402", "429", "500", "502", "503"}


@dataclass
class Fault:
    kind: str
    at: str = "any"
    times: int | None = 1  # None: until cleared
    retry_after: float | None = None
    delay: float = 5.0
    location: str | None = None  # "redirect" / "foreign_url": the other host's base URL
    variant: str | None = None  # "moderation": which documented signal (each fake lists its own)
    reasons: list[str] | None = None  # "moderation": BFL's / Fireworks' Moderation Reasons, fal's categories


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


@dataclass(frozen=True)
class Received:
    """One request a fake received, measured: what a benchmark or a size limit cares about."""

    method: str
    path: str  # with the query
    host: str  # the Host it was sent to: which of the fake's servers
    size: int  # bytes of the request body


@dataclass(frozen=True)
class Refusal:
    """A request body a fake refused because it breaks the route's published schema (or a documented
    limit the schema cannot say, e.g. Replicate's 256 KB for data URLs)."""

    route: str  # the contract's key, e.g. "replicate.flux-kontext-apps__multi-image-kontext-pro"
    status: int  # what the fake answered (fal: at the result URL)
    problems: list[str]  # "path: message", e.g. "input.prompt_upsampling: not a field of this route"


@dataclass
class Upload:
    """A file put in a provider's storage: Replicate's files API, fal's storage upload."""

    id: str
    filename: str
    content_type: str
    url: str  # what the provider hands back for use as an input: Replicate's urls.get, fal's file_url
    data: bytes = b""
    uploaded: bool = True  # fal: False until the PUT to the upload URL arrives
    metadata: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # of the request that carried the bytes

    @property
    def size(self) -> int:
        return len(self.data)


async def record(
    requests: list[Any], request: Request, *, with_query: bool = False, received: list[Received] | None = None
) -> Any:
    """Append (method, path, headers, JSON body or raw bytes) to a fake's log, and the body's size to
    `received`; return the body."""
    body: Any = None
    raw = await request.body()
    if raw:
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
    path = request.url.path + (f"?{request.url.query}" if with_query and request.url.query else "")
    requests.append((request.method, path, dict(request.headers), body))
    if received is not None:
        query = f"?{request.url.query}" if request.url.query else ""
        received.append(Received(request.method, request.url.path + query, request.headers.get("host", ""), len(raw)))
    return body


# -- the published contracts, answered in FastAPI/pydantic's words -------------------------------------------

# pydantic v2's error type and message per JSON Schema keyword (BFL and fal are FastAPI/pydantic apps).
_PYDANTIC = {
    "required": ("missing", "Field required"),
    "additionalProperties": ("extra_forbidden", "Extra inputs are not permitted"),
    "minimum": ("greater_than_equal", "Input should be greater than or equal to {}"),
    "maximum": ("less_than_equal", "Input should be less than or equal to {}"),
    "minLength": ("string_too_short", "String should have at least {} characters"),
    "maxLength": ("string_too_long", "String should have at most {} characters"),
}
_PYDANTIC_TYPES = {
    "string": ("string_type", "Input should be a valid string"),
    "integer": ("int_type", "Input should be a valid integer"),
    "number": ("float_type", "Input should be a valid number"),
    "boolean": ("bool_type", "Input should be a valid boolean"),
    "array": ("list_type", "Input should be a valid list"),
    "object": ("dict_type", "Input should be a valid dictionary"),
}


def pydantic_detail(problems: Sequence[Problem], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """422 `detail` items ({loc, msg, type}) for schema problems, as a FastAPI app words them."""
    items = []
    for p in problems:
        rule = subschema(schema, p.path)
        if p.keyword == "type":
            kind, msg = _PYDANTIC_TYPES.get(_first_type(rule), ("value_error", p.message))
        elif p.keyword in ("enum", "const"):
            allowed = _keyword(rule, "enum") or [_keyword(rule, "const")]
            words = [repr(a) for a in allowed]
            listed = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
            kind, msg = "literal_error", f"Input should be {listed}"
        elif p.keyword in _PYDANTIC:
            kind, template = _PYDANTIC[p.keyword]
            bound = _keyword(rule, p.keyword)
            if p.conditional:  # the cap lives in a then-branch, not on the property itself
                bound = conditional_bound(schema, p)
            msg = template.format(bound)
        else:
            kind, msg = "value_error", p.message
        items.append({"loc": ["body", *p.path], "msg": msg, "type": kind})
    return items


def detail_lines(items: Sequence[dict[str, Any]]) -> list[str]:
    """pydantic-style detail items as "path: msg" lines (for `Refusal.problems`)."""
    return [f"{'.'.join(str(x) for x in item['loc'][1:]) or '(body)'}: {item['msg']}" for item in items]


def subschema(schema: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
    """The subschema that describes the value at `path` of a body (following properties, items and
    local $refs)."""
    node: Any = schema
    for part in path:
        node = _deref(schema, node)
        if isinstance(part, int):
            node = node.get("items", {}) if isinstance(node, dict) else {}
        else:
            node = node.get("properties", {}).get(part, {}) if isinstance(node, dict) else {}
    node = _deref(schema, node)
    return node if isinstance(node, dict) else {}


def _deref(schema: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = schema
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def _first_type(rule: dict[str, Any]) -> str:
    kind = rule.get("type")
    if isinstance(kind, list):
        return next((k for k in kind if k != "null"), "null")
    if kind is None:
        return next((_first_type(b) for b in rule.get("anyOf", []) if _first_type(b) != "null"), "")
    return str(kind)


def _keyword(rule: dict[str, Any], keyword: str) -> Any:
    """A keyword's value on a field's schema, or on the first anyOf branch that has it (a nullable enum
    is `anyOf: [{enum}, {type: null}]`)."""
    if keyword in rule:
        return rule[keyword]
    return next((b[keyword] for b in rule.get("anyOf", []) if isinstance(b, dict) and keyword in b), None)


def conditional_bound(schema: dict[str, Any], problem: Problem) -> Any:
    """The bound a then-branch puts on a field (safety_tolerance <= 2 with an input image)."""
    owner = subschema(schema, problem.path[:-1])
    then = owner.get("then", {}) if isinstance(owner, dict) else {}
    return then.get("properties", {}).get(problem.path[-1], {}).get(problem.keyword)


class DropConnection(Exception):
    """Raised after a partial response: uvicorn cuts the connection, the client sees it dropped."""


async def http_fault(
    fault: Fault, send_error: Callable[[int, dict[str, str]], Response], request: Request | None = None
) -> Response | None:
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
    if fault.kind == "huge":
        padding = "x" * (17 * 1024 * 1024)
        return Response(f'{{"status": "Ready", "padding": "{padding}"}}'.encode(), media_type="application/json")
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@functools.cache
def other_loopback_host() -> str:
    """A loopback host that is not 127.0.0.1, for a fake's second server: 127.0.0.2 where the system
    routes all of 127/8 to loopback (Linux), else the name "localhost" (another host to a URL, the
    same interface)."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "localhost"


class Annex:
    """A second server of a fake, on another loopback host and port than the fake's own: BFL's polling
    cluster, fal's storage. It runs on the fake app's event loop, started and stopped by the app's
    lifespan (`Starlette(..., lifespan=annexes(...))`), so whatever serves the fake (`serve`, a
    benchmark's uvicorn) serves it too. `url` is its base URL while it runs, else None."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.url: str | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        host = other_loopback_host()
        sock = socket.socket()
        sock.bind((host, 0))
        server = uvicorn.Server(uvicorn.Config(self.app, log_level="critical", access_log=False, lifespan="off"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        deadline = time.monotonic() + 30
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("a fake's second server did not start")
            await asyncio.sleep(0.005)
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        try:
            yield self.url
        finally:
            self.url = None
            server.should_exit = True
            await task
            sock.close()


def annexes(*extra: Annex) -> Any:
    """A Starlette lifespan that runs these second servers while the app runs."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for annex in extra:
                await stack.enter_async_context(annex.running())
            yield

    return lifespan


@contextmanager
def serve(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Run an ASGI app under uvicorn on a free loopback port in a thread; yield its base URL."""
    port = free_port(host)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="critical", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
