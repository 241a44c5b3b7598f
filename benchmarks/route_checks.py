"""What judging a request body against a route's published schema costs: µs per check, in-process.

Typical bodies of the routes an image request is judged for (each prompt numbered, as users' prompts
differ), checked three ways, `--n` checks each, `--repeats` rounds interleaved, medians:

  jsonschema   Draft202012Validator.iter_errors over the vendored schema (what explains a problem)
  jsonschema-rs  the same schema compiled by jsonschema-rs, is_valid only
  Route.problems what the gateway asks per route and check

    .venv/bin/python benchmarks/route_checks.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kontext_gateway.providers import contracts
from kontext_gateway.providers.routes import Route, route

BFL = {
    "prompt": "a lighthouse at dusk",
    "aspect_ratio": "1:1",
    "output_format": "jpeg",
    "seed": 7,
    "safety_tolerance": 2,
}
REPLICATE = {"input": {"prompt": "a lighthouse at dusk", "aspect_ratio": "1:1", "output_format": "png", "seed": 7}}
REPLICATE_DEV = {"input": {**REPLICATE["input"], "num_inference_steps": 60, "guidance": 12}}  # two problems

CASES: list[tuple[str, Route, dict[str, Any]]] = [
    ("bfl flux-kontext-pro", route("bfl", "flux-kontext-pro"), BFL),
    ("bfl flux-kontext-max", route("bfl", "flux-kontext-max"), BFL),
    ("replicate flux-kontext-max", route("replicate", "black-forest-labs/flux-kontext-max"), REPLICATE),
    (
        "replicate flux-kontext-dev (2 problems)",
        route("replicate", "black-forest-labs/flux-kontext-dev"),
        REPLICATE_DEV,
    ),
]


def numbered(body: dict[str, Any], i: int) -> dict[str, Any]:
    if "input" in body:
        return {"input": {**body["input"], "prompt": f"{body['input']['prompt']} #{i}"}}
    return {**body, "prompt": f"{body['prompt']} #{i}"}


def timed(check: Callable[[dict[str, Any]], Any], bodies: list[dict[str, Any]]) -> float:
    t0 = time.perf_counter()
    for body in bodies:
        check(body)
    return (time.perf_counter() - t0) / len(bodies) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="checks per way and round (default 2000)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds, interleaved (default 5)")
    args = ap.parse_args()
    print("| route | jsonschema, µs | jsonschema-rs, µs | Route.problems, µs | problems |")
    print("|---|---:|---:|---:|---:|")
    for name, r, body in CASES:
        file = r.key + ".schema.json"
        python = contracts._validator(file)
        quick = contracts._quick_validator(file)
        ways: dict[str, Callable[[dict[str, Any]], Any]] = {
            "python": lambda b, v=python: list(v.iter_errors(b)),
            "rs": lambda b, v=quick: v.is_valid(b),
            "route": r.problems,
        }
        results: dict[str, list[float]] = {w: [] for w in ways}
        for round_ in range(args.repeats):
            for way, check in ways.items():
                bodies = [numbered(body, round_ * args.n + i) for i in range(args.n)]
                results[way].append(timed(check, bodies))
        med = {w: statistics.median(v) for w, v in results.items()}
        found = len(r.problems(body))
        print(f"| {name} | {med['python']:.1f} | {med['rs']:.2f} | {med['route']:.1f} | {found} |")


if __name__ == "__main__":
    main()
