"""A fast fake of BFL's and Replicate's FLUX.1 Kontext APIs, for benchmarks: every task is done at once.

One uvicorn process (uvloop + httptools, TLS) serves every host on one port; requests are told apart
by their Host header, so with the names resolved to 127.0.0.1 (see gateway_vs_litellm.py) clients use
the providers' production URLs:

    api.bfl.ai           POST /v1/flux-kontext-pro | -max (x-key)  -> {id, polling_url, cost, input_mp, output_mp}
    api.us1.bfl.ai       GET  /v1/get_result?id=...   (x-key)      -> {id, status: "Ready", result: {sample}, ...}
    delivery-us1.bfl.ai  GET  /results/{id}/sample.{png|jpeg|webp}?se=...&sig=...  -> the image
    api.replicate.com    POST /v1/models/{owner}/{name}/predictions (Bearer; `Prefer: wait` -> finished, 201)
                         GET  /v1/predictions/{id}                  -> the prediction, succeeded
    replicate.delivery   GET  /xezq/{id}/output.{png|jpg}           -> the image

Bodies are held to the providers' published contracts (kontext_gateway.providers.contracts, closed: an
unknown field is refused), answered with the providers' own 422 bodies (tests/fakes/bfl.py's
`validate` and tests/fakes/replicate.py's `invalid_fields` wording). Validators are compiled once (the
contracts module caches them). The answers are checked against the published response schemas once,
at start-up.

Unlike the strict fakes of tests/fakes/, nothing here waits or throttles: no pending polls, no limit on
active tasks, no request log. Tasks are kept in a bounded table (the newest `--keep`), so a poll after
that many newer tasks answers `Task not found` / 404, as an expired one would.

The results: one picture, made at start-up, that compresses like a photo (smooth gradients, soft
blobs and sensor-like noise; ~1.7 MB as a 1024x1024 PNG, ~0.15 MB as a quality-90 JPEG), in the
format the request asks for (the route's published default otherwise; webp is encoded on first use).
Each result's bytes are made unique by a comment carrying the task id (a PNG tEXt chunk, a JPEG COM
segment; webp is served as encoded), so a content-addressed store never deduplicates them; the pixels
are the same. Every aspect ratio gets the square picture.

    python benchmarks/fast_upstream.py --port 443 --certfile server.pem --keyfile server.key
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import io
import json
import struct
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Host, Route, Router

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fakes.bfl import ERRORS as BFL_ERRORS
from fakes.bfl import MODELS as BFL_MODELS
from fakes.bfl import validate as bfl_validate
from fakes.replicate import MODELS as REPLICATE_MODELS
from fakes.replicate import _invalid_field, error_body
from kontext_gateway.providers import contracts

BFL_HOST = "api.bfl.ai"
BFL_POLL_HOST = "api.us1.bfl.ai"
BFL_DELIVERY_HOST = "delivery-us1.bfl.ai"
REPLICATE_HOST = "api.replicate.com"
REPLICATE_DELIVERY_HOST = "replicate.delivery"
HOSTS = (BFL_HOST, BFL_POLL_HOST, BFL_DELIVERY_HOST, REPLICATE_HOST, REPLICATE_DELIVERY_HOST)
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


def photo_like(size: int = 1024, noise: float = 3.0, seed: int = 7) -> Image.Image:
    """A square RGB picture that compresses like a photo: low-frequency waves, soft blobs, grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    channels = []
    for _ in range(3):
        v = np.full((size, size), 128.0, np.float32)
        for _ in range(6):
            fx, fy = rng.uniform(0.5, 4.0, 2)
            v += rng.uniform(10, 40) * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
        for _ in range(5):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            v += rng.uniform(-60, 60) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        channels.append(v)
    pixels = np.stack(channels, -1) + rng.normal(0, noise, (size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(picture: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        picture.save(buf, "PNG")
    elif fmt in ("jpeg", "jpg"):
        picture.save(buf, "JPEG", quality=90)
    else:
        picture.save(buf, "WEBP", quality=90)
    return buf.getvalue()


def tagged(data: bytes, fmt: str, tag: str) -> bytes:
    """The same image with `tag` in a comment: a PNG tEXt chunk before IEND, a JPEG COM after SOI."""
    text = tag[:200].encode("latin-1", "replace")
    if fmt == "png":
        chunk = b"tEXt" + b"Comment\x00" + text
        return (
            data[:-12] + struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[-12:]
        )
    if fmt in ("jpeg", "jpg"):
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]
    return data


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


class Bounded(collections.OrderedDict[str, Any]):
    """A dict that forgets its oldest entries past `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if len(self) > self.limit:
            self.popitem(last=False)


class FastUpstream:
    """The app: BFL's and Replicate's hosts on one server, answering at once."""

    def __init__(self, *, bfl_key: str, replicate_token: str, port: int, keep: int = 4096, size: int = 1024) -> None:
        self.bfl_key = bfl_key
        self.replicate_token = replicate_token
        self.suffix = "" if port == 443 else f":{port}"
        picture = photo_like(size)
        self.picture = picture
        self.images = {"png": encode(picture, "png"), "jpeg": encode(picture, "jpeg")}
        self.images["jpg"] = self.images["jpeg"]
        self.size_mp = round(size * size / 1e6, 2)
        self.bfl_tasks = Bounded(keep)  # id -> output format
        self.predictions = Bounded(keep)  # id -> the prediction
        self.refused = 0  # bodies refused since start-up; the first 20 are printed to stderr
        self.quiet = False
        self.replicate_schemas = {key: contracts.route_schema(key) for key, _ in REPLICATE_MODELS.values()}
        self.bfl_default = {
            m: contracts.route_schema(f"bfl.{m}")["properties"]["output_format"].get("default", "png")
            for m in BFL_MODELS
        }
        self.app = Starlette(
            routes=[
                Host(
                    BFL_HOST,
                    Router([Route("/v1/{model}", self.bfl_submit, methods=["POST"])]),
                ),
                Host(BFL_POLL_HOST, Router([Route("/v1/get_result", self.bfl_poll, methods=["GET"])])),
                Host(
                    BFL_DELIVERY_HOST,
                    Router([Route("/results/{id}/sample.{ext}", self.bfl_result, methods=["GET"])]),
                ),
                Host(
                    REPLICATE_HOST,
                    Router(
                        [
                            Route("/v1/models/{owner}/{name}/predictions", self.replicate_create, methods=["POST"]),
                            Route("/v1/predictions/{id}", self.replicate_get, methods=["GET"]),
                        ]
                    ),
                ),
                Host(
                    REPLICATE_DELIVERY_HOST,
                    Router([Route("/xezq/{id}/output.{ext}", self.replicate_result, methods=["GET"])]),
                ),
            ]
        )

    def url(self, host: str, path: str) -> str:
        return f"https://{host}{self.suffix}{path}"

    def image(self, fmt: str) -> bytes:
        if fmt not in self.images:
            self.images[fmt] = encode(self.picture, fmt)
        return self.images[fmt]

    def _refuse(self, route: str, lines: list[str]) -> None:
        self.refused += 1
        if self.refused <= 20 and not self.quiet:
            print(f"fast_upstream: refused {route}: {'; '.join(lines)}", file=sys.stderr, flush=True)

    # -- BFL -------------------------------------------------------------------------------------------

    @staticmethod
    def _bfl_error(status: int) -> JSONResponse:
        return JSONResponse({"detail": BFL_ERRORS.get(status, "error")}, status_code=status)

    def bfl_submit_body(self, model: str, body: Any) -> tuple[int, dict[str, Any]]:
        """(status, JSON answer) for a submit of `body` to /v1/{model}, the key already checked."""
        if model not in BFL_MODELS:
            return 404, {"detail": "Not Found"}
        errors, input_ratio = bfl_validate(f"bfl.{model}", body)
        if errors:
            self._refuse(f"bfl.{model}", [f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors])
            return 422, {"detail": errors}
        task_id = str(uuid.uuid4())
        self.bfl_tasks[task_id] = body.get("output_format") or self.bfl_default[model]
        return 200, {
            "id": task_id,
            "polling_url": self.url(BFL_POLL_HOST, f"/v1/get_result?id={task_id}"),
            "cost": BFL_MODELS[model],
            "input_mp": self.size_mp if input_ratio else 0.0,
            "output_mp": self.size_mp,
        }

    def bfl_poll_body(self, task_id: str) -> tuple[int, dict[str, Any]]:
        fmt = self.bfl_tasks.get(task_id)
        body: dict[str, Any] = {"id": task_id, "result": None, "progress": None, "details": None, "preview": None}
        if fmt is None:
            return 404, {**body, "status": "Task not found"}
        # Delivery URLs are signed and expire in 10 minutes.
        sample = self.url(BFL_DELIVERY_HOST, f"/results/{task_id}/sample.{fmt}?se={int(time.time()) + 600}&sig=fake")
        return 200, {**body, "status": "Ready", "result": {"sample": sample}, "progress": 1.0}

    async def bfl_submit(self, request: Request) -> Response:
        raw = await request.body()
        if request.headers.get("x-key") != self.bfl_key:
            return self._bfl_error(401)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        status, answer = self.bfl_submit_body(request.path_params["model"], body)
        return JSONResponse(answer, status_code=status)

    async def bfl_poll(self, request: Request) -> Response:
        if request.headers.get("x-key") != self.bfl_key:
            return self._bfl_error(401)
        status, answer = self.bfl_poll_body(request.query_params.get("id", ""))
        return JSONResponse(answer, status_code=status)

    async def bfl_result(self, request: Request) -> Response:
        fmt = request.path_params["ext"]
        if fmt not in MEDIA:
            return JSONResponse({"detail": "Not found"}, status_code=404)
        return Response(tagged(self.image(fmt), fmt, request.path_params["id"]), media_type=MEDIA[fmt])

    # -- Replicate -------------------------------------------------------------------------------------

    def replicate_create_body(self, model: str, body: Any) -> tuple[int, dict[str, Any]]:
        """(status, JSON answer) for a prediction of `body` on `model` (owner/name), the token checked:
        the finished prediction."""
        if model not in REPLICATE_MODELS:
            return 404, error_body(404, "The requested resource could not be found.", title="Not found")
        key, default_format = REPLICATE_MODELS[model]
        problems = contracts.request_problems(key, body)
        if problems:
            invalid = [_invalid_field(p, self.replicate_schemas[key]) for p in problems]
            lines = [f"{p['field']}: {p['description']}" for p in invalid]
            self._refuse(key, lines)
            detail = "".join(f"- {line}\n" for line in lines)
            return 422, error_body(422, detail, title="Input validation failed", invalid_fields=invalid)
        pid = uuid.uuid4().hex[:26]
        inputs = body["input"]
        fmt = inputs.get("output_format", default_format)
        now = _now()
        prediction = {
            "id": pid,
            "model": model,
            "version": "hidden",
            "input": inputs,
            "logs": "",
            "output": self.url(REPLICATE_DELIVERY_HOST, f"/xezq/{pid}/output.{fmt}"),
            "data_removed": False,
            "error": None,
            "status": "succeeded",
            "source": "api",
            "created_at": now,
            "started_at": now,
            "completed_at": now,
            "urls": {
                "get": self.url(REPLICATE_HOST, f"/v1/predictions/{pid}"),
                "cancel": self.url(REPLICATE_HOST, f"/v1/predictions/{pid}/cancel"),
                "stream": self.url(REPLICATE_HOST, f"/v1/predictions/{pid}/stream"),
                "web": f"https://replicate.com/p/{pid}",
            },
            "metrics": {"predict_time": 0.0, "total_time": 0.0},
        }
        self.predictions[pid] = prediction
        return 201, prediction

    def _replicate_authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.replicate_token}"

    async def replicate_create(self, request: Request) -> Response:
        raw = await request.body()
        if not self._replicate_authorized(request):
            return JSONResponse(error_body(401), status_code=401)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        status, answer = self.replicate_create_body(model, body)
        if status >= 400:
            return JSONResponse(answer, status_code=status, media_type="application/problem+json")
        # Done at once, so `Prefer: wait` and a plain create both get the finished prediction.
        return JSONResponse(answer, status_code=status)

    async def replicate_get(self, request: Request) -> Response:
        if not self._replicate_authorized(request):
            return JSONResponse(error_body(401), status_code=401)
        prediction = self.predictions.get(request.path_params["id"])
        if prediction is None:
            return JSONResponse(error_body(404, "Not found."), 404, media_type="application/problem+json")
        return JSONResponse(prediction)

    async def replicate_result(self, request: Request) -> Response:
        fmt = request.path_params["ext"]
        if fmt not in MEDIA:
            return JSONResponse({"detail": "Not found"}, status_code=404)
        return Response(tagged(self.image(fmt), fmt, request.path_params["id"]), media_type=MEDIA[fmt])

    # -- a check of the answers against the published response schemas --------------------------------

    def self_check(self) -> list[str]:
        """Problems of this fake's own answers against the published schemas ([] when they conform)."""
        found: list[str] = []
        self.quiet = True
        status, submit = self.bfl_submit_body("flux-kontext-pro", {"prompt": "a fox", "output_format": "png"})
        found += [f"bfl submit ({status}): {e}" for e in contracts.response_errors("bfl.submit", submit)]
        status, polled = self.bfl_poll_body(submit["id"])
        found += [f"bfl poll ({status}): {e}" for e in contracts.response_errors("bfl.get_result", polled)]
        refused = self.bfl_submit_body("flux-kontext-pro", {"prompt": "a fox", "width": 1024})
        found += [f"bfl 422: {e}" for e in contracts.response_errors("bfl.validation-error", refused[1])]
        if refused[0] != 422:
            found.append("bfl: an unknown field was not refused")
        model = "black-forest-labs/flux-kontext-pro"
        status, prediction = self.replicate_create_body(model, {"input": {"prompt": "a fox", "output_format": "png"}})
        found += [
            f"replicate prediction ({status}): {e}"
            for e in contracts.response_errors("replicate.prediction", prediction)
        ]
        if self.replicate_create_body(model, {"input": {"prompt": "a fox", "width": 1024}})[0] != 422:
            found.append("replicate: an unknown field was not refused")
        for name, data in (("png", self.images["png"]), ("jpeg", self.images["jpeg"])):
            with Image.open(io.BytesIO(tagged(data, name, "check"))) as im:
                im.load()
        self.bfl_tasks.clear()
        self.predictions.clear()
        self.refused, self.quiet = 0, False
        return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=443, help="port to serve on; URLs name it unless it is 443")
    ap.add_argument("--certfile", required=True, help="server certificate (PEM) for the hosts above")
    ap.add_argument("--keyfile", required=True, help="its private key (PEM)")
    ap.add_argument("--bfl-key", default="bfl_test", help="the x-key BFL calls must carry")
    ap.add_argument("--replicate-token", default="r8_test", help="the Bearer token Replicate calls must carry")
    ap.add_argument("--keep", type=int, default=4096, help="tasks remembered for polls (default 4096)")
    ap.add_argument("--size", type=int, default=1024, help="side of the square result picture (default 1024)")
    args = ap.parse_args()
    fake = FastUpstream(
        bfl_key=args.bfl_key, replicate_token=args.replicate_token, port=args.port, keep=args.keep, size=args.size
    )
    problems = fake.self_check()
    if problems:
        sys.exit("fast_upstream: answers break the published schemas:\n" + "\n".join(problems))
    print(
        f"fast_upstream: PNG {len(fake.images['png']) / 1e6:.2f} MB, JPEG {len(fake.images['jpeg']) / 1e6:.2f} MB, "
        f"https on {args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        fake.app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
