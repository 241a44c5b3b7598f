"""`kontext`: serve the API, list models, or generate / edit an image from the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
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
  kontext usage --days 7 --group-by day,model     # requests, images and cost from the database
  kontext serve --workers 0 & kontext worker      # API and workers apart
  kontext generate "a red fox in the snow" -o fox.png --size 512x512 --seed 7
  kontext edit fox.png "make it night" -o night.webp --model kontext-tiny
  kontext keys create --name team-a --budget 25 --budget-period month --rpm 60 --json
  kontext keys list

environment:
  KONTEXT_DATA_DIR          data directory (database, images, URL-signing key); default ./data
  DATABASE_URL              postgresql://... to use PostgreSQL instead of SQLite
  KONTEXT_BLOB_URL          s3://bucket/prefix: images and uploads in S3-compatible storage (AWS_* variables:
                            credentials, AWS_REGION, AWS_ENDPOINT_URL); default: the data directory
  KONTEXT_BLOB_LINKS        gateway (default: signed links served by the gateway) or presigned (the store's)
  KONTEXT_DEV_WEIGHTS_DIR   FLUX.1 Kontext [dev] weights in diffusers layout, served by the local engine
  KONTEXT_DEFAULT_MODEL     model used when a request names none (default kontext-tiny)
  KONTEXT_ADMIN_KEY         an admin API key without a database row (setting it makes every /v1 call need a key)
  KONTEXT_RATE_LIMIT_URL    redis://... or postgresql://... to share per-key rate limits between processes
  KONTEXT_ALLOWED_HOSTS     host names to answer to besides localhost / 127.0.0.1 / [::1] (set it when
                            serving beyond loopback: others get 400, against DNS rebinding)
  KONTEXT_CORS_ORIGINS      origins of other sites whose pages may call the API (others get 403)
  KONTEXT_LOCAL_MAX_REQUEST_PIXELS  n x width x height one request may ask of the local engine
                            (default 4 megapixels on a CPU, 16 on a GPU)
  KONTEXT_LORA_DIR          directory of LoRA adapters that requests name in `loras`
  KONTEXT_ENGINE_TRANSFORMER  lean: our FLUX.1 transformer (same pictures; `acceleration` regular/high);
                            diffusers (default): the reference, needed for LoRAs
  KONTEXT_LOG_FORMAT        json or text (default: text on a terminal, JSON lines otherwise)
  PROMETHEUS_MULTIPROC_DIR  an empty directory shared by the API and worker processes: /metrics
                            then shows all of them (metrics of each process otherwise)
"""


def main(argv: list[str] | None = None) -> int:
    """`kontext`. A configuration it cannot start with (errors.StartupError: a blob store it cannot use,
    say) is one line on stderr and exit status 1, not a traceback."""
    from .errors import StartupError

    try:
        return _main(argv)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="kontext",
        description="Kontext Gateway: an OpenAI-compatible image API for FLUX.1 Kontext [dev], [pro] and [max].",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kontext-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the HTTP API server",
        description="Run the OpenAI-compatible HTTP API (base URL http://HOST:PORT/v1). On SIGTERM it "
        "drains: takes no more jobs, gives running jobs and open requests KONTEXT_DRAIN_TIMEOUT_S "
        "(default 30) to finish, hands the rest back to the queue and exits 0.",
    )
    serve.add_argument(
        "--host", default=os.environ.get("KONTEXT_HOST", "127.0.0.1"), help="address to bind (default 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=int, default=int(os.environ.get("KONTEXT_PORT", "8000")), help="port (default 8000)"
    )
    _data_dir_arg(serve)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _log_format_arg(serve)
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="hosted jobs this process runs at once (default 256; 0: only serve the API and leave "
        "the jobs to `kontext worker` processes on the same database)",
    )
    serve.add_argument(
        "--local-workers",
        type=int,
        default=None,
        help="local-engine jobs this process holds at once, in their own lane (default 1; 0: none)",
    )

    worker = sub.add_parser(
        "worker",
        help="run jobs from the database, without the HTTP API",
        description="Claim and run jobs (image requests and predictions) from the "
        "database: several workers on one PostgreSQL database each claim a "
        "job exactly once; on one machine, workers and an API process (serve --workers 0) may share "
        "the data directory's SQLite file instead, and see each other's jobs by looking at it every "
        "50 ms. On SIGINT / SIGTERM it drains: no more claims, running jobs get "
        "KONTEXT_DRAIN_TIMEOUT_S (default 30) to finish, the rest go back to the queue (another "
        "worker resumes them without submitting them upstream again); a second signal hands them "
        "back at once. Exits 0.",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="hosted jobs run at once (default 256; 0 with --local-workers N: the local engine's jobs only, "
        "one such worker per GPU)",
    )
    worker.add_argument(
        "--local-workers",
        type=int,
        default=None,
        help="local-engine jobs held at once, in their own lane (default 1; 0: this worker runs none)",
    )
    _log_format_arg(worker)
    _data_dir_arg(worker)

    models = sub.add_parser("models", help="list the models in the catalog")
    models.add_argument("--json", action="store_true", help="print the catalog as JSON")

    sub.add_parser(
        "providers",
        help="how each request parameter reaches each hosted route (a markdown table)",
        description="For every hosted route, the body field each request parameter becomes and the range the "
        "provider publishes for it, found by building requests with the gateway's own code.",
    )

    usage = sub.add_parser(
        "usage",
        help="requests, images and cost by day, key, model and provider",
        description="Usage totals from the database (the same as GET /v1/usage), days in UTC, with a TOTAL row.",
    )
    usage.add_argument("--key", help="only this key's requests (its id, key_...)")
    usage.add_argument("--model", help="only this model (id or alias)")
    usage.add_argument("--provider", help="only this provider (e.g. fal) or config key (fal/flux.1-kontext-pro)")
    usage.add_argument("--days", type=int, help="only the last N days, today included (default: all)")
    usage.add_argument(
        "--group-by",
        default="day,key,model,provider",
        help="comma list of day, key, model, provider (default: all four)",
    )
    usage.add_argument("--json", action="store_true", help="print the GET /v1/usage JSON")
    _data_dir_arg(usage)

    keys = sub.add_parser(
        "keys",
        help="create, list, show, update or revoke API keys",
        description="API keys, stored hashed in the database: a running server sees a "
        "change at once. Once a key exists, every /v1 call needs "
        "'Authorization: Bearer <key>'.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = keys_sub.add_parser("create", help="make a key (printed once: store it)")
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument("--admin", action="store_true", help="may manage keys and see every request")
    _key_limit_args(create)
    for action, text in (
        ("list", "list keys, revoked ones included"),
        ("show", "one key's limits and spend"),
        ("update", "change a key's limits ('none' removes one)"),
        ("revoke", "revoke a key"),
    ):
        p = keys_sub.add_parser(action, help=text)
        if action != "list":
            p.add_argument("key_id", help="the key's id (key_...), as `kontext keys list` shows")
        if action == "update":
            _key_limit_args(p)
    for p in keys_sub.choices.values():
        p.add_argument("--json", action="store_true", help="print JSON")
        _data_dir_arg(p)

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
    if args.command == "providers":
        from .providers.table import markdown

        print(markdown(), end="")
        return 0
    if args.command == "usage":
        return asyncio.run(_usage(args))
    if args.command == "keys":
        return asyncio.run(_keys(args))
    if args.command == "worker":
        return asyncio.run(_worker(args))
    if args.command in ("generate", "edit"):
        return asyncio.run(_image(args))
    parser.print_help()
    return 0


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="data directory (database, images, signing key); default $KONTEXT_DATA_DIR or ./data",
    )


def _log_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=["json", "text"],
        default=None,
        help="log lines as JSON objects or text (default $KONTEXT_LOG_FORMAT, else text on a "
        "terminal and JSON otherwise)",
    )


def _configure_logs(args: argparse.Namespace, settings: Any, level: str) -> None:
    from . import logs

    logs.configure(level, json=logs.choose_format(args.log_format) == "json", secrets=logs.settings_secrets(settings))


def _key_limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", metavar="USD", help="spending limit in US dollars ('none': no limit)")
    p.add_argument(
        "--budget-period",
        choices=["day", "week", "month", "none"],
        help="the budget renews each UTC day / week / month (default: for the key's lifetime)",
    )
    p.add_argument("--rpm", help="requests per minute ('none': no limit)")
    p.add_argument("--ipm", help="images per minute ('none': no limit)")
    p.add_argument("--max-concurrent", help="requests running at once ('none': no limit)")
    p.add_argument("--models", help="comma-separated model ids or aliases it may use ('none': all)")


def _key_limits(args: argparse.Namespace) -> dict[str, Any]:
    """Only the limits given on the command line; 'none' clears one."""
    out: dict[str, Any] = {}
    for name, cast in (
        ("budget", float),
        ("rpm", int),
        ("ipm", int),
        ("max_concurrent", int),
        ("models", str),
        ("budget_period", str),
    ):
        value = getattr(args, name, None)
        if value is None:
            continue
        field = "budget_usd" if name == "budget" else name
        try:
            out[field] = None if value == "none" else cast(value)
        except ValueError:
            raise SystemExit(f"error: --{name.replace('_', '-')} takes a number (or 'none'), not {value!r}") from None
    return out


async def _keys(args: argparse.Namespace) -> int:
    from .catalog import Catalog
    from .errors import GatewayError
    from .keys import KeyStore
    from .store.db import Database
    from .store.keys import KeyRows

    settings = _settings(args)
    db = Database(settings.resolved_database_url())
    await db.start()
    store = KeyStore(KeyRows(db), Catalog.load(settings.catalog_path))
    try:
        action = args.keys_command
        if action == "create":
            view, key = await store.create(name=args.name, admin=args.admin, limits=_key_limits(args))
            result: Any = {**view, "key": key}
        elif action == "list":
            result = await store.list()
        elif action == "show":
            result = await store.get(args.key_id)
        elif action == "update":
            result = await store.update(args.key_id, _key_limits(args))
        else:
            result = await store.revoke(args.key_id)
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await db.close()
    if args.json:
        print(json.dumps(result, indent=2))
    elif action == "list":
        _print_table(
            [("ID", "NAME", "KEY", "STATUS", "BUDGET", "SPENT", "RPM", "IPM", "MODELS")]
            + [
                (
                    k["id"],
                    k["name"],
                    k["hint"],
                    k["status"] + (" admin" if k["admin"] else ""),
                    _money(k["budget_usd"]),
                    _money(k["spent_usd"]),
                    str(k["rpm"] or "-"),
                    str(k["ipm"] or "-"),
                    ",".join(k["models"] or ["all"]),
                )
                for k in result
            ]
        )
    else:
        for name, value in result.items():
            if name != "key":
                print(f"{name:16} {value if value is not None else '-'}")
        if action == "create":
            print(f"\n{result['key']}\n\nThis is the only time the key is shown: store it now.", file=sys.stderr)
    return 0


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output file; its extension picks the format unless --format is given. "
        "With -n above 1, files are numbered (out-1.png, out-2.png, ...)",
    )
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
    from . import collector

    collector.pause_while_starting()  # until the app has started (create_app's on_started)

    import logging
    import signal

    import uvicorn

    from . import metrics
    from .api.app import create_app
    from .store.blob_url import open_blob_store

    settings = _settings(args)
    settings.host, settings.port = args.host, args.port
    if args.workers is not None:
        settings.workers = args.workers
    if args.local_workers is not None:
        settings.local_workers = args.local_workers
    _configure_logs(args, settings, args.log_level)
    # Checked before uvicorn starts: a blob store it cannot use is then one line (StartupError, see
    # main), where the app's own start-up (Gateway.start, which checks it again) would log a traceback.
    # The data directory's own folder is left to Gateway.start, which makes the directory private first.
    store = open_blob_store(settings)
    if settings.blob_url:
        asyncio.run(store.writable())
    logging.getLogger("kontext_gateway").info(
        "Kontext Gateway on http://%s:%s/v1 (data in %s)", args.host, args.port, settings.data_dir
    )
    # Started, before it listens: what the process has built so far lives as long as it does.
    app = create_app(settings, on_started=lambda: metrics.gc_frozen(collector.settle_after_start()))

    class DrainingServer(uvicorn.Server):
        """On SIGTERM (or Ctrl-C) the gateway takes no more jobs at once; uvicorn then stops listening
        and gives requests still open the drain timeout to be answered, the running jobs as long."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            gateway = getattr(app.state, "gateway", None)
            if gateway is not None and not self.should_exit:
                with contextlib.suppress(RuntimeError):  # no loop running: nothing to drain
                    asyncio.get_running_loop().call_soon_threadsafe(gateway.begin_drain)
            super().handle_exit(sig, frame)
            # Drained, the process exits 0 as a deploy expects (uvicorn would raise SIGTERM again
            # once shut down, ending the process by the signal).
            with contextlib.suppress(ValueError):
                self._captured_signals.remove(signal.SIGTERM)

    # log_config=None: uvicorn's loggers keep the handler installed above (JSON, redacted).
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        log_config=None,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
    )
    DrainingServer(config).run()
    metrics.process_exit()
    return 0


async def _worker(args: argparse.Namespace) -> int:
    import logging
    import signal

    from . import collector

    collector.pause_while_starting()  # until the gateway has started

    from . import metrics
    from .gateway import Gateway

    settings = _settings(args)
    _configure_logs(args, settings, "info")
    if args.concurrency is not None:
        settings.workers = args.concurrency
    if args.local_workers is not None:
        settings.local_workers = args.local_workers
    if settings.workers < 1 and settings.local_lane(settings.workers) < 1:
        print(
            "error: a worker runs hosted jobs (--concurrency N) or local ones (--local-workers N), or both",
            file=sys.stderr,
        )
        return 2
    gateway = Gateway(settings)
    await gateway.start(api=False)
    metrics.gc_frozen(collector.settle_after_start())
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: hand the running jobs back now
            gateway.worker.hand_back_now()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    logging.getLogger("kontext_gateway").info(
        "worker %s running up to %d hosted and %d local jobs (database %s)",
        gateway.worker.id,
        settings.workers,
        settings.local_workers,
        settings.resolved_database_url().split("@")[-1],
    )
    await stop.wait()
    # Drain: no more claims; running jobs get drain_timeout_s to end, the rest go back to the queue.
    gateway.begin_drain()
    await gateway.close()
    metrics.process_exit()
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
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    return 0


async def _usage(args: argparse.Namespace) -> int:
    """Reads the database directly (no server needed, no workers started)."""
    from datetime import UTC, datetime, timedelta

    from .errors import GatewayError
    from .gateway import Gateway

    if args.days is not None and args.days < 1:
        print("error: --days must be at least 1", file=sys.stderr)
        return 2
    start = None if args.days is None else datetime.now(UTC).date() - timedelta(days=args.days - 1)
    gateway = Gateway(_settings(args))
    await gateway.db.start()
    try:
        report = await gateway.history.usage(
            key_id=args.key, model=args.model, provider=args.provider, start=start, group_by=args.group_by
        )
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        await gateway.db.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    columns = [
        (g, t)
        for g, t in (
            ("day", "DAY"),
            ("key_id", "KEY"),
            ("key_name", "KEY NAME"),
            ("model", "MODEL"),
            ("provider", "PROVIDER"),
        )
        if g.split("_")[0] in report["group_by"]
    ]
    counts = [("requests", "REQUESTS"), ("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("images", "IMAGES")]

    def numbers(item: dict[str, Any]) -> list[str]:
        return [str(item[c]) for c, _ in counts] + [f"{item['cost_micros'] / 1_000_000:.6f}"]  # exact micros

    heads = [t for _, t in columns] or [""]
    rows = [heads + [t for _, t in counts] + ["COST (USD)"]]
    rows += [([str(item.get(g) or "-") for g, _ in columns] or [""]) + numbers(item) for item in report["data"]]
    rows.append(["TOTAL"] + [""] * (len(heads) - 1) + numbers(report["totals"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:  # labels to the left, numbers to the right
        cells = enumerate(zip(r, widths, strict=False))
        print("  ".join(c.ljust(w) if i < len(heads) else c.rjust(w) for i, (c, w) in cells).rstrip())
    return 0


async def _image(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .errors import GatewayError
    from .gateway import Gateway
    from .protocol import ImageSource, image_call

    fmt = args.format or _format_from_suffix(args.output)
    fields: dict[str, Any] = {"prompt": args.prompt, "n": args.n, "output_format": fmt, "response_format": "b64_json"}
    for key, value in (
        ("model", args.model),
        ("size", args.size),
        ("aspect_ratio", args.aspect_ratio),
        ("resolution", args.resolution),
        ("seed", args.seed),
        ("num_inference_steps", args.steps),
        ("cfg_scale", args.guidance),
        ("output_compression", args.compression),
    ):
        if value is not None:
            fields[key] = value
    files = []
    if args.command == "edit":
        try:
            files.append(ImageSource("image", data=args.image.read_bytes()))
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
        call = image_call("edit" if args.command == "edit" else "text-to-image", fields, files)
        outcome = await gateway.images.create(call, base_url="http://localhost/", progress=progress)
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        await gateway.close()
    paths = _numbered(args.output, len(outcome.blobs))
    for path, data in zip(paths, outcome.blobs, strict=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    meta = outcome.body["metadata"]
    for path in paths:
        print(f"{path}  {outcome.body['size']} {fmt}  seed {meta['seed']}  {meta['executed_model']}")
    return 0


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "gif": "gif", "webp": "webp", "avif": "avif"}.get(
        suffix, "png"
    )


def _numbered(path: Path, count: int) -> list[Path]:
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, count + 1)]


if __name__ == "__main__":
    raise SystemExit(main())
