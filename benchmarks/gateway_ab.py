"""Two versions of the gateway side by side on the same fast upstream, in alternating slices: CPU-ms per
request and req/s of each, and the per-pair ratio B/A.

For a change whose effect is a few per cent: on a shared VM the machine's own speed drifts by more than
that over minutes (the same code measured 4.1 and 5.6 CPU-ms per request a few minutes apart), so
separate runs of each version cannot tell the two apart. Here both run at once (two `kontext serve`
processes, shipped defaults, a data dir each, one fake upstream: `gateway_vs_litellm.py`'s, with its TLS
and host names) and take the load in turns: slices of `--slice` seconds in the order A B B A A B B A
..., each slice with `--warmup` seconds of the same load first. A slow spell then falls on both sides
alike, and each A slice is compared with the B slice next to it: the ratio B/A per pair, its median and
its range, say whether B moved and how far. The side not under load is idle.

When the VM's speed swings within seconds (pairs of the same code 10-20 % apart), `--together` loads
both sides at once instead: each slice sends `--clients` closed loops to A and as many to B over the
same seconds, so every swing falls on both alike, and B/A is read per slice. Both share the cores then,
so absolute figures are lower than alone; the ratio is what it is for.

    .venv/bin/python benchmarks/gateway_ab.py --a /tmp/before/src            # B: this checkout's src
    .venv/bin/python benchmarks/gateway_ab.py --a /tmp/before/src --b /tmp/after/src --upstream bfl-png
    .venv/bin/python benchmarks/gateway_ab.py --a /tmp/before/src --upstream bfl-png --response-format b64_json
    .venv/bin/python benchmarks/gateway_ab.py --a /tmp/before/src --together --clients 32

`--a` / `--b`: a `src` directory each (e.g. `mkdir -p /tmp/before && git archive <rev> src | tar -x -C /tmp/before`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common import CpuWatch, free_port, machine, run_loop, server_command
from gateway_vs_litellm import (
    PROMPT,
    ROOT,
    UPSTREAMS,
    Process,
    Run,
    Target,
    base_env,
    gateway_env,
    http_ready,
    load,
    run_load,
    start_fake_upstream,
)


@contextlib.contextmanager
def started(srcs: dict[str, Path], tmp: Path, port: int | None) -> Iterator[tuple[Process, dict[str, Target]]]:
    """The fake upstream and one gateway per src directory, running (as the targets of the load); stopped
    on the way out."""
    env = base_env()
    processes: list[Process] = []
    try:
        fake = start_fake_upstream(tmp, port, env)
        processes.append(fake.process)
        targets: dict[str, Target] = {}
        body = {"prompt": PROMPT, "aspect_ratio": "1:1", "response_format": "url"}
        for side, src in srcs.items():
            gw_port = free_port()
            command = server_command(gw_port, str(tmp / f"data-{side}"))
            gateway = Process(side, command, gateway_env(env, fake, src), tmp / f"{side}.log")
            processes.append(gateway.start(http_ready(gw_port, "/health"), timeout=120))
            url = f"http://127.0.0.1:{gw_port}/v1/images/generations"
            targets[side] = Target(side, url, {}, body, gateway)
        yield fake.process, targets
    finally:
        for p in reversed(processes):
            p.stop()


def order(slices: int) -> list[str]:
    """A B B A A B B A ...: `slices` of each, every pair adjacent, neither side always first."""
    pairs = [("A", "B") if i % 2 == 0 else ("B", "A") for i in range(slices)]
    return [side for pair in pairs for side in pair]


def run_together(
    targets: dict[str, Target], first: str, args: argparse.Namespace, fake_pid: int, repeat: int
) -> dict[str, Run]:
    """One slice of `--together`: both sides under the same load over the same seconds, `first`'s clients
    started first (the order alternates between slices)."""
    runs = {side: Run(args.upstream, args.clients, side, repeat) for side in targets}
    sides = sorted(targets, key=lambda side: side != first)

    async def both() -> None:
        await asyncio.gather(
            *(load(targets[s], args.clients, args.slice, args.warmup, fake_pid, runs[s]) for s in sides)
        )

    run_loop(both())
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="side A's src directory (the baseline)")
    ap.add_argument("--b", type=Path, default=ROOT / "src", help="side B's src directory (default: this checkout's)")
    ap.add_argument("--upstream", choices=list(UPSTREAMS), default="bfl-jpeg", help="default bfl-jpeg")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients (default 8)")
    ap.add_argument("--slice", type=float, default=6.0, help="measured seconds per slice (default 6)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each slice (default 1)")
    ap.add_argument("--pairs", type=int, default=10, help="slices per side, paired (default 10)")
    ap.add_argument("--port", type=int, default=None, help="the fake's port (default 443 when it can be bound)")
    ap.add_argument(
        "--response-format",
        choices=["url", "b64_json"],
        default="url",
        help="url (the default: a link to the stored result) or b64_json (the result read back into the answer)",
    )
    ap.add_argument("--fetch", action="store_true", help="fetch each answer's URL too, as a client showing it would")
    ap.add_argument(
        "--together",
        action="store_true",
        help="load both sides at once in each slice (--clients each), for a VM whose speed swings within seconds",
    )
    args = ap.parse_args()
    srcs = {"A": args.a.resolve(), "B": args.b.resolve()}
    for side, src in srcs.items():
        if not (src / "kontext_gateway").is_dir():
            sys.exit(f"--{side.lower()} {src}: no kontext_gateway package there")
    up = UPSTREAMS[args.upstream]
    print(f"machine: {machine()}")
    watch = CpuWatch()
    runs: dict[str, list[Run]] = {"A": [], "B": []}
    tmp = tempfile.TemporaryDirectory(prefix="kontext-ab-")
    with tmp, started(srcs, Path(tmp.name), args.port) as (fake, targets):
        for side, target in targets.items():
            assert target.process is not None
            target.body.update(model=up.gateway_model, output_format=up.fmt, response_format=args.response_format)
            target.fetch = args.fetch
            rss = target.process.idle_rss_mb
            print(f"{side}: pid {target.process.pid}, src {srcs[side]}, idle RSS {rss:.0f} MiB")
        print(
            f"{args.upstream}, response_format {args.response_format}{', URL fetched' if args.fetch else ''}, "
            f"{args.clients} clients, "
            f"{args.pairs} slices of {args.slice:g} s per side{', both sides at once' if args.together else ''}\n"
        )
        sequence = order(args.pairs)
        for i in range(args.pairs if args.together else len(sequence)):
            if args.together:
                slice_runs = list(run_together(targets, "AB"[i % 2], args, fake.pid, i + 1).values())
            else:
                run = Run(args.upstream, args.clients, sequence[i], i // 2 + 1)
                run_load(targets[run.side], args.clients, args.slice, args.warmup, fake.pid, run)
                slice_runs = [run]
            for run in slice_runs:
                if run.errors or not run.n:
                    sys.exit(f"{run.side}: {run.errors} errors in slice {i + 1}, e.g. {run.error_sample}")
                runs[run.side].append(run)
                print(f"  pair {run.repeat:2d} {run.side}: {run.rps:6.1f} req/s, {run.server_cpu_ms:.3f} CPU-ms/req")
    cpu = {s: [r.server_cpu_ms for r in runs[s]] for s in runs}
    rps = {s: [r.rps for r in runs[s]] for s in runs}
    cpu_ratio = [b / a for a, b in zip(cpu["A"], cpu["B"], strict=True)]
    rps_ratio = [b / a for a, b in zip(rps["A"], rps["B"], strict=True)]
    print("\n| medians | A | B | B/A per pair: median | mean ± standard error | min | max |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, values, ratios in (("CPU-ms per request", cpu, cpu_ratio), ("req/s", rps, rps_ratio)):
        a, b = statistics.median(values["A"]), statistics.median(values["B"])
        mean, se = statistics.mean(ratios), statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
        print(
            f"| {name} | {a:.3f} | {b:.3f} | {statistics.median(ratios):.3f} | {mean:.3f} ± {se:.3f} "
            f"| {min(ratios):.3f} | {max(ratios):.3f} |"
        )
    below = sum(r < 1 for r in cpu_ratio)
    print(f"\nB cheaper than A in {below} of {len(cpu_ratio)} pairs (CPU per request)")
    print(f"\n{watch.report()}")


if __name__ == "__main__":
    main()
