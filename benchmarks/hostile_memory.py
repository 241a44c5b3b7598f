"""Peak memory of the worst requests a client can send: what one request can cost the server.

Starts `kontext serve` (embedded defaults, a fresh data dir) and sends each case once, on its own:
hostile bodies (a 10 MB prompt, 28 MB of `[{},{},...]`, deep nesting, n x area), and the largest
documented payloads (a JSON edit with three 48 MB PNGs, a 12-megapixel phone photo, the local engine's
largest allowed output). For each: the status, the time, and the server's resident memory before,
at its peak during the request (VmHWM, reset before each case through /proc/PID/clear_refs) and after.

    .venv/bin/python benchmarks/hostile_memory.py            # every case
    .venv/bin/python benchmarks/hostile_memory.py --only prompt_10mb_predictions,tiny_values_28mb
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python benchmarks/hostile_memory.py  # that code instead

Linux only (/proc). Prints one row per case and the machine.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuWatch, Server, machine

Case = tuple[str, str, dict[str, str], bytes]  # method, path, headers, body
JSON = {"content-type": "application/json"}


def noise_png(width: int, height: int) -> bytes:
    """Incompressible pixels: the PNG is as large as the image (a worst case for a given file size)."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def phone_jpeg() -> bytes:
    """A 12-megapixel (4032x3024) JPEG at quality 92, with smooth content like a photo's."""
    small = Image.frombytes("RGB", (126, 95), os.urandom(126 * 95 * 3))
    buf = io.BytesIO()
    small.resize((4032, 3024), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[dict[str, str], bytes]:
    request = httpx.Request("POST", "http://x/", data=fields, files=[(n, (f, d, "image/jpeg")) for n, f, d in files])
    return {"content-type": request.headers["content-type"]}, request.read()


def cases() -> dict[str, Callable[[], Case]]:
    prompt = "a fox in the snow " * 580_000  # 10.4 MB

    def tiny_values() -> Case:
        items = b"[" + b",".join([b"{}"] * 9_300_000) + b"]"  # 28 MB
        return "POST", "/v1/predictions", JSON, b'{"model":"kontext-tiny","input":{"prompt":"a","x":' + items + b"}}"

    def edit_json_3x48mb() -> Case:
        urls = [
            {"image_url": "data:image/png;base64," + base64.b64encode(noise_png(4000, 4000)).decode()} for _ in range(3)
        ]
        body = json.dumps({"model": "kontext-tiny", "prompt": "night", "images": urls}).encode()
        return "POST", "/v1/images/edits?dryRun=true", JSON, body

    def phone_photo_edit() -> Case:
        headers, body = multipart(
            {"model": "kontext-tiny", "prompt": "night", "size": "1024x768", "num_inference_steps": "2"},
            [("image", "photo.jpg", phone_jpeg())],
        )
        return "POST", "/v1/images/edits", headers, body

    def gen(body: dict) -> Callable[[], Case]:
        return lambda: ("POST", "/v1/images/generations", JSON, json.dumps({"model": "kontext-tiny", **body}).encode())

    return {
        "prompt_10mb_generations": gen({"prompt": prompt}),
        "prompt_10mb_predictions": lambda: (
            "POST",
            "/v1/predictions",
            JSON,
            json.dumps({"model": "kontext-tiny", "input": {"prompt": prompt}}).encode(),
        ),
        "tiny_values_28mb": tiny_values,
        "nested_100k": lambda: (
            "POST",
            "/v1/predictions",
            JSON,
            b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        ),
        "n10_at_2048": gen({"prompt": "a fox", "n": 10, "size": "2048x2048", "num_inference_steps": 2}),
        "local_max_2048_2_steps": gen({"prompt": "a fox", "size": "2048x2048", "num_inference_steps": 2}),
        "local_max_4x1024_2_steps": gen({"prompt": "a fox", "n": 4, "size": "1024x1024", "num_inference_steps": 2}),
        "edit_json_3x48mb_dry_run": edit_json_3x48mb,
        "phone_photo_edit_12mp": phone_photo_edit,
    }


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--skip", help="comma-separated case names")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    args = parser.parse_args()
    wanted = cases()
    if args.only:
        wanted = {k: v for k, v in wanted.items() if k in args.only.split(",")}
    if args.skip:
        wanted = {k: v for k, v in wanted.items() if k not in args.skip.split(",")}
    watch = CpuWatch()
    print(
        f"{'case':28} {'body MB':>8} {'status':>6} {'s':>7} {'RSS before':>10} {'peak':>8} {'added':>8} "
        f"{'after':>8}  (MiB)"
    )
    with Server() as server:
        assert server.proc is not None
        pid = server.proc.pid
        with httpx.Client(base_url=server.url, timeout=args.timeout) as client:
            client.post(
                "/v1/images/generations",
                json={"model": "kontext-tiny", "prompt": "warm up", "size": "64x64", "num_inference_steps": 1},
            )  # loads torch and the model
            for name, build in wanted.items():
                method, path, headers, body = build()
                time.sleep(0.5)
                before = status_kb(pid, "VmRSS")
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                t0 = time.perf_counter()
                try:
                    status = str(client.request(method, path, headers=headers, content=body).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__[:6]
                seconds = time.perf_counter() - t0
                peak, after = status_kb(pid, "VmHWM"), status_kb(pid, "VmRSS")
                print(
                    f"{name:28} {len(body) / 2**20:8.1f} {status:>6} {seconds:7.2f} {before / 1024:10.0f} "
                    f"{peak / 1024:8.0f} {(peak - before) / 1024:8.0f} {after / 1024:8.0f}",
                    flush=True,
                )
                del body
    print(machine())
    print(watch.report())


if __name__ == "__main__":
    main()
