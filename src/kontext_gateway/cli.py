"""`kontext`: serve the API, list models, or generate / edit an image from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__

EXAMPLES = """\
examples:
  kontext serve                                   # http://127.0.0.1:8000, data in ./data
  kontext serve --host 0.0.0.0 --port 9000 --data-dir /var/lib/kontext
  kontext models
  kontext serve --workers 0 & kontext worker --concurrency 16   # API and workers apart
  kontext generate "a red fox in the snow" -o fox.png --size 512x512 --seed 7
  kontext edit fox.png "make it night" -o night.webp --model kontext-tiny

environment:
  KONTEXT_DATA_DIR          data directory (database, images, URL-signing key); default ./data
  DATABASE_URL              postgresql://... to use PostgreSQL instead of SQLite
  KONTEXT_DEV_WEIGHTS_DIR   FLUX.1 Kontext [dev] weights in diffusers layout, served by the local engine
  KONTEXT_DEFAULT_MODEL     model used when a request names none (default kontext-tiny)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kontext",
        description="Kontext Gateway: an OpenAI-compatible image API for FLUX.1 Kontext [dev], [pro] and [max].",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kontext-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP API server",
                           description="Run the OpenAI-compatible HTTP API (base URL http://HOST:PORT/v1).")
    serve.add_argument("--host", default=os.environ.get("KONTEXT_HOST", "127.0.0.1"),
                       help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=int(os.environ.get("KONTEXT_PORT", "8000")),
                       help="port (default 8000)")
    _data_dir_arg(serve)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--workers", type=int, default=None,
                       help="jobs this process runs at once (default 8; 0: only serve the API and leave the "
                            "jobs to `kontext worker` processes on the same database)")

    worker = sub.add_parser("worker", help="run jobs from the database, without the HTTP API",
                            description="Claim and run jobs (image requests and predictions) from the "
                                        "database: several workers on one PostgreSQL database each claim a "
                                        "job exactly once. Stops on SIGINT / SIGTERM.")
    worker.add_argument("--concurrency", type=int, default=None, help="jobs run at once (default 8)")
    _data_dir_arg(worker)

    models = sub.add_parser("models", help="list the models in the catalog")
    models.add_argument("--json", action="store_true", help="print the catalog as JSON")

    gen = sub.add_parser("generate", help="make an image from a prompt (runs locally, no server needed)")
    gen.add_argument("prompt")
    _image_args(gen)

    edit = sub.add_parser("edit", help="edit an image with a prompt (runs locally, no server needed)")
    edit.add_argument("image", type=Path, help="input image (PNG, JPEG, WebP or GIF)")
    edit.add_argument("prompt")
    _image_args(edit)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "models":
        return _models(args)
    if args.command == "worker":
        return asyncio.run(_worker(args))
    if args.command in ("generate", "edit"):
        return asyncio.run(_image(args))
    parser.print_help()
    return 0


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="data directory (database, images, signing key); default $KONTEXT_DATA_DIR or ./data")


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output file; its extension picks the format unless --format is given. "
                        "With -n above 1, files are numbered (out-1.png, out-2.png, ...)")
    p.add_argument("--model", default=None, help="model id or alias (default kontext-tiny)")
    p.add_argument("--size", help="WxH (e.g. 1024x1024), W:H (e.g. 16:9) or auto")
    p.add_argument("--aspect-ratio", help="shape, e.g. 16:9 (mapped to the nearest supported)")
    p.add_argument("--resolution", help="scale tier: 0.5K, 1K, 2K, 4K or megapixels (mapped to the nearest)")
    p.add_argument("--seed", type=int, help="seed for a reproducible image")
    p.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--steps", type=int, help="inference steps (model default when omitted)")
    p.add_argument("--guidance", type=float, help="guidance scale (model default when omitted)")
    p.add_argument("--format", choices=["png", "jpeg", "gif", "webp", "avif"], help="output format")
    p.add_argument("--compression", type=int, help="quality 0-100 for jpeg, webp and avif")
    _data_dir_arg(p)


def _settings(args: argparse.Namespace) -> Any:
    from .config import Settings

    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app

    settings = _settings(args)
    settings.host, settings.port = args.host, args.port
    if args.workers is not None:
        settings.workers = args.workers
    print(f"Kontext Gateway on http://{args.host}:{args.port}/v1 (data in {settings.data_dir})", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.log_level == "debug")
    return 0


async def _worker(args: argparse.Namespace) -> int:
    import logging
    import signal

    from .gateway import Gateway

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request's full URL at INFO; a webhook URL may carry a token in its query.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = _settings(args)
    if args.concurrency is not None:
        settings.workers = args.concurrency
    if settings.workers < 1:
        print("error: --concurrency must be at least 1", file=sys.stderr)
        return 2
    gateway = Gateway(settings)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"worker {gateway.worker.id} running up to {settings.workers} jobs "
          f"(database {settings.resolved_database_url().split('@')[-1]})", file=sys.stderr, flush=True)
    await stop.wait()
    await gateway.close()  # running jobs are left to the next worker: their leases run out
    return 0


def _models(args: argparse.Namespace) -> int:
    from .catalog import Catalog

    catalog = Catalog.load(_settings(args).catalog_path)
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in catalog.models], indent=2))
        return 0
    rows = [("ID", "NAME", "MODES", "MAX INPUTS", "PROVIDERS (USD/image)")]
    for m in catalog.models:
        providers = ", ".join(f"{p.config_key} {p.pricing.price_per_image():g}" for p in m.providers)
        rows.append((m.id, m.name, "+".join(m.modes), str(m.max_input_images), providers))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    return 0


async def _image(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .errors import GatewayError
    from .gateway import Gateway
    from .service import InputFile

    fmt = args.format or _format_from_suffix(args.output)
    fields: dict[str, Any] = {"prompt": args.prompt, "n": args.n, "output_format": fmt, "response_format": "b64_json"}
    for key, value in (("model", args.model), ("size", args.size), ("aspect_ratio", args.aspect_ratio),
                       ("resolution", args.resolution), ("seed", args.seed), ("num_inference_steps", args.steps),
                       ("cfg_scale", args.guidance), ("output_compression", args.compression)):
        if value is not None:
            fields[key] = value
    files = []
    if args.command == "edit":
        try:
            files.append(InputFile(args.image.read_bytes()))
        except OSError as exc:
            print(f"error: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
            return 2

    gateway = Gateway(_settings(args))
    await gateway.start()
    bar = tqdm(total=None, desc="loading model", unit="step", file=sys.stderr, leave=False)

    def progress(step: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
            bar.set_description("denoising")
        bar.n = step
        bar.refresh()

    try:
        outcome = await gateway.images.create(
            mode="edit" if args.command == "edit" else "text-to-image", fields=fields, files=files,
            base_url="http://localhost/", progress=progress,
        )
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        await gateway.close()
    paths = _numbered(args.output, len(outcome.blobs))
    for path, data in zip(paths, outcome.blobs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    meta = outcome.body["metadata"]
    for path in paths:
        print(f"{path}  {outcome.body['size']} {fmt}  seed {meta['seed']}  {meta['executed_model']}")
    return 0


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "gif": "gif", "webp": "webp", "avif": "avif"}.get(suffix, "png")


def _numbered(path: Path, count: int) -> list[Path]:
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count + 1)]


if __name__ == "__main__":
    raise SystemExit(main())
