"""Where one request's time goes at one client: each step of the serial path, wall-clock and CPU.

A profile (py-spy) says where the CPU goes, summed over requests; it cannot say what a request waits
for, nor how long each step takes end to end. This runs the gateway from a copy of its src with
timestamps inserted at named points (MARKS below: the request's arrival at the ASGI app, its job's
row, each upstream call, the download, the check, the blob put on its thread, the job's end, the
answer), loads it with one client on `gateway_vs_litellm.py`'s fast upstream fake (TLS, published
shapes, done at once), and prints, per step between two points, the median wall-clock milliseconds
and, where both points are on one thread, that thread's CPU milliseconds (the rest of a step's wall
time is waiting: on the upstream, the disk, another thread). `direct`, the same three upstream calls
made by aiohttp from this process, is the upstream's own latency in the same run.

The copy is only this benchmark's: nothing is added to the gateway itself. Each mark is anchored on a
line of the code; when the code moves and an anchor is gone, the script stops and names it.

    .venv/bin/python benchmarks/request_timeline.py                       # bfl-jpeg, 10 s
    .venv/bin/python benchmarks/request_timeline.py --upstream bfl-png --duration 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from common import machine
from gateway_vs_litellm import HOOK, HOSTS, UPSTREAMS, Run, run_load, started, targets_for

ROOT = Path(__file__).resolve().parent.parent

# The recorder, written into the copy: (perf_counter ns, thread id, label, thread CPU ns) per mark, kept in
# memory and written out when the process exits (SIGTERM: uvicorn returns, atexit runs).
RECORDER = """
import atexit, json, threading, time

_marks = []


def mark(label):
    _marks.append((time.perf_counter_ns(), threading.get_ident(), label, time.thread_time_ns()))


@atexit.register
def _dump():
    with open({out!r}, "w") as f:
        json.dump(_marks, f)
"""

# (module, anchor, what it becomes): `mark("...")` calls inserted at the request's serial path.
MARKS: list[tuple[str, str, str]] = [
    (
        "api/headers.py",
        "            return await self.app(scope, receive, send)\n",
        '            return await self.app(scope, receive, send)\n        _timeline.mark("request in")\n',
    ),
    (
        "api/headers.py",
        "            await send(message)\n",
        "            await send(message)\n"
        '            if message["type"] == "http.response.body" and not message.get("more_body"):\n'
        '                _timeline.mark("answer sent")\n',
    ),
    (
        "api/images.py",
        "    gw = gateway(request)\n    request.state.model",
        '    _timeline.mark("body parsed")\n    gw = gateway(request)\n    request.state.model',
    ),
    (
        "service.py",
        "        worker = await self.jobs.reserve(lane)\n",
        '        worker = await self.jobs.reserve(lane)\n        _timeline.mark("validated, priced")\n',
    ),
    (
        "service.py",
        "        if worker is not None:\n            self.jobs.hand(record)",
        '        _timeline.mark("job row written")\n        if worker is not None:\n            self.jobs.hand(record)',
    ),
    (
        "service.py",
        "        return await self.render(await self.wait(request_id), base_url)",
        '        ended = await self.wait(request_id)\n        _timeline.mark("waiter woken")\n'
        '        outcome = await self.render(ended, base_url)\n        _timeline.mark("answer made")\n'
        "        return outcome",
    ),
    (
        "jobs/runner.py",
        "            entry, result = await self.router.run(candidates, job)\n",
        '            _timeline.mark("job rebuilt, routed")\n'
        "            entry, result = await self.router.run(candidates, job)\n"
        '            _timeline.mark("provider returned")\n',
    ),
    (
        "jobs/runner.py",
        "        finally:\n            self._stop_reason.pop(rid, None)",
        '        finally:\n            _timeline.mark("job ended (row)")\n            self._stop_reason.pop(rid, None)',
    ),
    (
        "providers/hosted.py",
        "        try:\n            resp = await self.http.send(",
        '        _timeline.mark("call " + call.method)\n        try:\n            resp = await self.http.send(',
    ),
    (
        "providers/hosted.py",
        "        answer = Answer(resp.status_code, _json_or_none(resp), resp.headers)",
        '        _timeline.mark("answered " + call.method)\n'
        "        answer = Answer(resp.status_code, _json_or_none(resp), resp.headers)",
    ),
    (
        "providers/hosted.py",
        "            row = await asyncio.shield(journal.submitted(",
        '            _timeline.mark("task read")\n            row = await asyncio.shield(journal.submitted(',
    ),
    (
        "providers/hosted.py",
        "task)) if journal else None\n",
        'task)) if journal else None\n            _timeline.mark("task recorded")\n',
    ),
    (
        "providers/hosted.py",
        "            data = await self._fetch_result(url)\n",
        '            _timeline.mark("download")\n            data = await self._fetch_result(url)\n'
        '            _timeline.mark("downloaded")\n',
    ),
    (
        "providers/hosted.py",
        "        return ProviderImage(data=data, format=fmt, size=Size(*size))",
        '        _timeline.mark("checked")\n        return ProviderImage(data=data, format=fmt, size=Size(*size))',
    ),
    (
        "jobs/journal.py",
        "        img.blob_id = await self.blobs.put(",
        '        _timeline.mark("put asked")\n        img.blob_id = await self.blobs.put(',
    ),
    (
        "jobs/journal.py",
        "        blob_ids = [img.blob_id for img in kept",
        '        _timeline.mark("put returned")\n        blob_ids = [img.blob_id for img in kept',
    ),
    (
        "store/blobs.py",
        "        blob_id = content_id(data, ext)\n",
        '        _timeline.mark("thread: put begun")\n        blob_id = content_id(data, ext)\n'
        '        _timeline.mark("thread: hashed")\n',
    ),
    (
        "store/blobs.py",
        "        tmp = target.with_name(",
        '        _timeline.mark("thread: looked for it")\n        tmp = target.with_name(',
    ),
    (
        "store/blobs.py",
        "                os.fsync(fd)\n",
        '                _timeline.mark("thread: file made, written")\n                os.fsync(fd)\n'
        '                _timeline.mark("thread: fsynced")\n',
    ),
    (
        "store/blobs.py",
        "            os.replace(tmp, target)\n",
        '            os.replace(tmp, target)\n            _timeline.mark("thread: renamed")\n',
    ),
]


def instrumented_copy(src: Path, into: Path, out: Path) -> Path:
    """`src` copied to `into`/src with the marks inserted and the recorder writing to `out`."""
    copy = into / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    package = copy / "kontext_gateway"
    (package / "_timeline.py").write_text(RECORDER.format(out=str(out)))
    for module, anchor, replacement in MARKS:
        path = package / module
        text = path.read_text()
        if text.count(anchor) != 1:
            sys.exit(f"{module}: the anchor {anchor.strip()[:70]!r} is not there once: update MARKS to the code")
        text = text.replace(anchor, replacement)
        if "import _timeline" not in text:
            dots = "." * (module.count("/") + 1)
            text = text.replace(
                "\nfrom __future__ import annotations\n",
                f"\nfrom __future__ import annotations\n\nfrom {dots} import _timeline\n",
                1,
            )
        path.write_text(text)
    return copy


def steps(marks: list[list], skip: float) -> tuple[int, dict[str, list[tuple[float, float | None, bool]]]]:
    """Each request's marks in order (from `request in` to `answer sent`), as steps between two marks:
    {"a -> b": [(wall ms, CPU ms of that thread or None, same thread), ...]}; the first `skip` of the
    requests (a fraction: warm-up) left out."""
    marks.sort()
    requests: list[list[tuple[int, int, str, int]]] = []
    for t, thread, label, cpu in marks:
        if label == "request in":
            requests.append([])
        if requests:
            requests[-1].append((t, thread, label, cpu))
    whole = [r for r in requests if r[-1][2] == "answer sent" and any(m[2] == "body parsed" for m in r)]
    whole = whole[int(len(whole) * skip) :]
    out: dict[str, list[tuple[float, float | None, bool]]] = defaultdict(list)
    for r in whole:
        for (t0, th0, a, c0), (t1, th1, b, c1) in itertools.pairwise(r):
            same = th0 == th1
            out[f"{a} -> {b}"].append(((t1 - t0) / 1e6, (c1 - c0) / 1e6 if same else None, same))
        out["whole request, in the app"].append(((r[-1][0] - r[0][0]) / 1e6, None, False))
    return len(whole), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", choices=[u for u in UPSTREAMS if u.startswith("bfl")], default="bfl-jpeg")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of the same load first (default 2)")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the src to instrument (default this checkout's)")
    args = ap.parse_args()
    print(f"machine: {machine()}\nsrc: {args.src.resolve()}, {args.upstream}, one client, {args.duration:g} s")

    with tempfile.TemporaryDirectory(prefix="kontext-timeline-") as tmp_name:
        tmp = Path(tmp_name)
        out = tmp / "marks.json"
        setup_args = argparse.Namespace(
            src=instrumented_copy(args.src.resolve(), tmp, out), port=None, gateway_cpus=None
        )
        runs = {}
        with started(setup_args, tmp, want_litellm=False) as setup:
            exec(HOOK.format(hosts=HOSTS), {})  # `direct` resolves the fake's host names here, as the gateway does
            for target in targets_for(UPSTREAMS[args.upstream], setup):
                run = Run(args.upstream, 1, target.side, 1)
                run_load(target, 1, args.duration, args.warmup, setup["fake"].pid, run)
                runs[target.side] = run
        marks = json.loads(out.read_text())  # written as the gateway exited

    n, table = steps(marks, skip=args.warmup / (args.warmup + args.duration))
    k, d = runs["kontext"], runs["direct"]
    print(
        f"\nkontext: {k.n} requests, p50 {k.p50_ms:.2f} ms, {k.server_cpu_ms:.2f} CPU-ms each; direct (the upstream's "
        f"own three calls): p50 {d.p50_ms:.2f} ms; added {k.p50_ms - d.p50_ms:.2f} ms\n"
    )
    print(f"{n} requests' marks (the warm-up's left out); medians, ms\n")
    print("| step | wall | CPU, one thread | waiting |\n|---|---:|---:|---:|")
    for name, values in table.items():
        if len(values) < n / 2:
            continue  # a path only some requests take
        wall = statistics.median(v[0] for v in values)
        cpus = [v[1] for v in values if v[1] is not None]
        cpu = statistics.median(cpus) if len(cpus) == len(values) else None
        waiting = f"{max(wall - cpu, 0.0):.3f}" if cpu is not None else "-"
        print(f"| {name} | {wall:.3f} | {'-' if cpu is None else f'{cpu:.3f}'} | {waiting} |")
    print(
        "\nCPU is the thread's own (`time.thread_time`) between two marks on it; `-`: the two marks are on "
        "different threads (a hand-off). The time outside the app (the HTTP server's parsing and writing, "
        "the client) is the client's p50 less the whole request in the app."
    )


if __name__ == "__main__":
    main()
