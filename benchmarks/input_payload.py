"""What one phone photo costs upstream: the bytes an edit sends each hosted provider, and what it makes.

A 12-megapixel phone JPEG (4000x3000, about 4 MB, EXIF orientation 1) is sent to `POST
/v1/images/edits` of a `kontext serve` process once per hosted provider (`x-provider`), with
flux.1-kontext-pro. The four upstreams are the strict fakes of tests/fakes/ (they validate every body
against the provider's published schema and record the size of every request they receive, uploads
included). Printed per provider:

  request   bytes of the submit call's body (what the issue's 1.5 MB goal is about)
  uploads   bytes sent to the provider's file mechanism first (Replicate's files API, fal's storage)
  total     everything the provider received for the edit, polls excluded
  produced  the size of the image the request made (the fakes draw it from the input's aspect ratio)
  status    the gateway's answer (a fake refuses what its provider would: a data URL over 256 KB...)
  time      wall time of the whole request (fakes answer at once: this is the gateway's own work)

`--src DIR` runs the gateway from another checkout's `src` (e.g. a worktree of an older commit) with
this venv, so that the same script measures before and after a change.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from PIL import Image, ImageFilter

from common import free_port, machine, server_command, stop_process

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakes.bfl import FakeBFL  # noqa: E402
from fakes.common import serve  # noqa: E402
from fakes.fal import FakeFal  # noqa: E402
from fakes.fireworks import FakeFireworks  # noqa: E402
from fakes.replicate import FakeReplicate  # noqa: E402

PROVIDERS = ("replicate", "fal", "fireworks", "bfl")
ENV_KEYS = {
    "replicate": ("REPLICATE_API_TOKEN", "r8_test", "REPLICATE_BASE_URL"),
    "fal": ("FAL_KEY", "fal_test", "FAL_BASE_URL"),
    "fireworks": ("FIREWORKS_API_KEY", "fw_test", "FIREWORKS_BASE_URL"),
    "bfl": ("BFL_API_KEY", "bfl_test", "BFL_BASE_URL"),
}
UPLOAD_PATHS = ("/v1/files", "/storage/upload")


def phone_photo(width: int = 4000, height: int = 3000, quality: int = 95) -> bytes:
    """A photo-like 12 MP JPEG: smooth light, detail that survives scaling down, and sensor noise, as a
    phone saves it (about 4 MB; about 0.4 MB once scaled to 1 MP, like a real photo)."""
    base = Image.effect_mandelbrot((width // 4, height // 4), (-2.2, -1.2, 1.0, 1.2), 80).convert("RGB")
    base = base.resize((width, height), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    detail = Image.effect_noise((width // 3, height // 3), 40).convert("RGB")
    detail = detail.resize((width, height), Image.Resampling.BICUBIC)
    grain = Image.effect_noise((width, height), 24).convert("RGB")
    photo = Image.blend(Image.blend(base, detail, 0.2), grain, 0.15)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=quality, exif=Image.Exif())
    return buf.getvalue()


def start_gateway(urls: dict[str, str], fakes: dict[str, object], src: Path | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="kontext-bench-input-")
    env = {**os.environ, "KONTEXT_UPSTREAM_POLL_INTERVAL_S": "0.01", "KONTEXT_DEV_WEIGHTS_DIR": ""}
    hosts = {name: fake.other_origins for name, fake in fakes.items() if getattr(fake, "other_origins", None)}
    env["KONTEXT_PROVIDER_HOSTS"] = json.dumps(hosts)
    for name, (key_var, key, url_var) in ENV_KEYS.items():
        env[key_var], env[url_var] = key, urls[name]
    if getattr(fakes["fal"], "storage_url", None):
        env["FAL_STORAGE_URL"] = fakes["fal"].storage_url  # type: ignore[attr-defined]
    if src is not None:
        env["PYTHONPATH"] = str(src)
    log = open(Path(data_dir) / "server.log", "wb")
    proc = subprocess.Popen(server_command(port, data_dir), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not start: {(Path(data_dir) / 'server.log').read_text()[-2000:]}")
        time.sleep(0.05)


def measure(url: str, provider: str, fake: object, photo: bytes) -> dict[str, object]:
    fake.reset()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    resp = httpx.post(
        f"{url}/v1/images/edits",
        headers={"x-provider": provider},
        data={"model": "flux.1-kontext-pro", "prompt": "make it a winter evening", "response_format": "b64_json"},
        files={"image": ("IMG_0001.jpg", photo, "image/jpeg")},
        timeout=300,
    )
    seconds = time.perf_counter() - t0
    received = list(fake.received)  # type: ignore[attr-defined]
    uploads = [r for r in received if r.method in ("POST", "PUT") and any(p in r.path for p in UPLOAD_PATHS)]
    uploads += [r for r in received if r.method == "PUT"] if provider == "fal" else []
    uploads = list({id(r): r for r in uploads}.values())
    sent = [r for r in received if r.method == "POST" and r not in uploads and "get_result" not in r.path]
    body = resp.json()
    produced = body.get("size") if resp.status_code == 200 else None
    return {
        "provider": provider,
        "request": max((r.size for r in sent), default=0),
        "uploads": sum(r.size for r in uploads),
        "total": sum(r.size for r in sent) + sum(r.size for r in uploads),
        "produced": produced,
        "status": resp.status_code if resp.status_code == 200 else f"{resp.status_code} {body['error']['code']}",
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, help="run the gateway from this src directory (another checkout)")
    args = parser.parse_args()
    photo = phone_photo()
    print(f"# input: 4000x3000 JPEG, {len(photo) / 1e6:.2f} MB; gateway from {args.src or ROOT / 'src'}")
    print(f"# machine: {machine()}")
    fakes = {
        "replicate": FakeReplicate(pending_polls=0),
        "fal": FakeFal(pending_polls=0),
        "fireworks": FakeFireworks(pending_polls=0),
        "bfl": FakeBFL(pending_polls=0, run_s=0.0),
    }
    with ExitStack() as stack:
        urls = {name: stack.enter_context(serve(fake.app)) for name, fake in fakes.items()}
        proc, url = start_gateway(urls, fakes, args.src)
        try:
            measure(url, "bfl", fakes["bfl"], photo)  # warm-up: imports, first connections
            print(f"{'provider':10} {'request':>10} {'uploads':>10} {'total':>10} {'produced':>10} {'time':>7}  status")
            for provider in PROVIDERS:
                row = measure(url, provider, fakes[provider], photo)
                print(
                    f"{provider:10} {row['request'] / 1e3:>8.1f}kB {row['uploads'] / 1e3:>8.1f}kB "
                    f"{row['total'] / 1e3:>8.1f}kB {row['produced'] or '-':>10} "
                    f"{row['seconds']:>6.2f}s  {row['status']}"
                )
        finally:
            stop_process(proc)


if __name__ == "__main__":
    main()
