"""What each local-engine feature costs on kontext-tiny, in-process (no server), on the CPU.

Every case is one `KontextEngine.run(...)` at the output size (default 256x256), 4 steps, guidance 2.5,
n=1, seed 0: one untimed warm-up, then the median of `--runs` timed runs, in wall ms and as a multiple
of the baseline edit (one input image the size of the output). Edits clear the context-latent cache
before every timed run (outside the timer), so each pays its VAE encodes as a new picture would; the
cache row measures the same input twice (miss, then hit) instead.

The notes give what the run did: transformer passes, VAE encodes and decodes and the ms in each (forward
hooks on the modules; text encoders too), noise and context tokens (`engine.last_run`). LoRA rows run on a second engine
loaded from a saved copy of kontext-tiny (same weights), so the PEFT layers that loading an adapter
leaves in the transformer do not touch the other rows; adapters are written to a temporary directory in
the diffusers/PEFT layout that tests/test_engine_lora.py uses.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import CpuWatch, machine

RANK = 4
LORA_MODULES = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.ff.net.2",
    "single_transformer_blocks.0.proj_out",
)


def picture(side: int, seed: int) -> Image.Image:
    """Random RGB pixels (as the tests build inputs): distinct per seed, so the cache never confuses two."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8"))


def write_lora(engine: Any, path: Path, seed: int) -> Path:
    """A rank-4 adapter in the diffusers/PEFT layout, sized from the model (tests/test_engine_lora.py)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in LORA_MODULES:
        lin = engine.pipe.transformer.get_submodule(module)
        out[f"transformer.{module}.lora_A.weight"] = torch.randn(RANK, lin.in_features, generator=gen) * 0.3
        out[f"transformer.{module}.lora_B.weight"] = torch.randn(lin.out_features, RANK, generator=gen) * 0.3
    save_file(out, str(path))
    return path


class Counts:
    """Forward calls of the transformer, the VAE's encoder and decoder and the text encoders, and the wall
    ms spent in them (pre- and post-forward hooks)."""

    KEYS = ("transformer", "encode", "decode", "text")

    def __init__(self, engine: Any) -> None:
        pipe = engine.pipe
        self.reset()
        self._t0: dict[int, float] = {}
        for key, module in (
            ("transformer", pipe.transformer),
            ("encode", pipe.vae.encoder),
            ("decode", pipe.vae.decoder),
            ("text", pipe.text_encoder),
            ("text", pipe.text_encoder_2),
        ):
            module.register_forward_pre_hook(lambda m, *_a: self._t0.__setitem__(id(m), time.perf_counter()))
            module.register_forward_hook(lambda m, *_a, key=key: self._done(key, m))

    def _done(self, key: str, module: Any) -> None:
        self.n[key] += 1
        self.ms[key] += (time.perf_counter() - self._t0.pop(id(module))) * 1000

    def reset(self) -> None:
        self.n = dict.fromkeys(self.KEYS, 0)
        self.ms = dict.fromkeys(self.KEYS, 0.0)

    def text(self) -> str:
        n, ms = self.n, self.ms
        return (
            f"transformer {n['transformer']} passes {ms['transformer']:.0f} ms, VAE enc {n['encode']} "
            f"{ms['encode']:.0f} ms, dec {n['decode']} {ms['decode']:.0f} ms, text enc {ms['text']:.0f} ms"
        )


class Bench:
    def __init__(self, engine: Any, runs: int) -> None:
        self.engine = engine
        self.counts = Counts(engine)
        self.runs = runs

    def time(self, call: Callable[[], Any], *, clear_cache: bool = True, warmups: int = 1) -> list[float]:
        """ms of each timed call, after `warmups` untimed ones; counters hold the last call's."""
        times = []
        for i in range(warmups + self.runs):
            if clear_cache:
                self.engine.context_cache.clear()
            self.counts.reset()
            t0 = time.perf_counter()
            call()
            dt = (time.perf_counter() - t0) * 1000
            if i >= warmups:
                times.append(dt)
        return times

    def tokens(self) -> str:
        info = self.engine.last_run
        ctx = "+".join(str(t) for t in info.context_tokens) or "0"
        return f"tokens: {info.noise_tokens} noise + {ctx} context"


def spread(times: list[float]) -> str:
    return f"{min(times):.0f}–{max(times):.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="square output side (default 256; try 512)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case after one warm-up (default 5)")
    ap.add_argument("--steps", type=int, default=4, help="inference steps (default 4)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    watch = CpuWatch()

    import torch

    from kontext_gateway.engine.lora import LoraSpec
    from kontext_gateway.engine.pipeline import KontextEngine
    from kontext_gateway.params import Size

    engine = KontextEngine.tiny("cpu")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # from_dir's loading bars
    transformers_logging.disable_progress_bar()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {args.size}x{args.size}, {args.steps} steps, "
        f"median of {args.runs} after 1 warm-up",
        flush=True,
    )
    size = Size(args.size, args.size)
    inputs = [picture(args.size, seed) for seed in range(4)]
    mask = Image.new("L", (args.size, args.size), 0)
    mask.paste(255, (args.size // 2, 0, args.size, args.size))  # repaint the right half
    base: dict[str, Any] = dict(
        prompt="a red fox in the snow", output=size, steps=args.steps, guidance=2.5, n=1, seed=0
    )
    edit = dict(base, images=inputs[:1], contexts=[size])

    rows: list[tuple[str, float | None, str]] = []  # feature, ms p50, notes
    ref: dict[str, float] = {}

    def case(name: str, bench: Bench, kwargs: dict[str, Any], note: str = "", **kw: Any) -> float:
        times = bench.time(lambda: bench.engine.run(**kwargs), **kw)
        p50 = statistics.median(times)
        notes = f"{bench.counts.text()}; {bench.tokens()}" + (f"; {note}" if note else "")
        info = bench.engine.last_run
        if info.true_cfg:
            notes += "; true CFG"
        if info.previews:
            notes += f"; {info.previews} previews sent"
        if info.mode != "kontext":
            notes += f"; mode {info.mode}"
        rows.append((name, p50, f"{notes} (min–max {spread(times)} ms)"))
        print(f"{name}: {p50:.1f} ms  [{spread(times)}]", flush=True)
        return p50

    bench = Bench(engine, args.runs)
    ref["t2i"] = case("baseline text-to-image", bench, base)
    ref["edit"] = case("baseline edit (1 input)", bench, edit)
    case(
        "true CFG (negative_prompt, true_cfg_scale 4)",
        bench,
        dict(edit, negative_prompt="blurry, low quality", true_cfg_scale=4.0),
    )
    case("2 input images", bench, dict(base, images=inputs[:2], contexts=[size] * 2))
    case("4 input images", bench, dict(base, images=inputs[:4], contexts=[size] * 4))
    case("mask edit (inpaint + restore)", bench, dict(edit, mask=mask), "right half repainted")
    for k in (1, 3):
        case(f"partial previews: {k}", bench, dict(edit, partial_images=k, preview=lambda i, im: None))

    # Context-latent cache: the same input twice, a miss then a hit, `runs` pairs after one warm-up pair.
    cache = engine.context_cache
    src = inputs[0]
    miss, hit = [], []
    hits0, misses0 = cache.stats.hits, cache.stats.misses
    for i in range(1 + args.runs):
        cache.clear()
        t, enc, enc_ms = [], [], []
        for _ in range(2):
            bench.counts.reset()
            t0 = time.perf_counter()
            engine.run(**dict(base, images=[src.copy()], contexts=[size]))
            t.append((time.perf_counter() - t0) * 1000)
            enc.append(bench.counts.n["encode"])
            enc_ms.append(bench.counts.ms["encode"])
        if i:
            miss.append(t[0])
            hit.append(t[1])
    saved = statistics.median([m - h for m, h in zip(miss, hit, strict=False)])
    dh, dm = cache.stats.hits - hits0, cache.stats.misses - misses0
    rows.append(
        (
            "context cache: same input, 1st (miss)",
            statistics.median(miss),
            f"VAE enc {enc[0]} {enc_ms[0]:.0f} ms (min–max {spread(miss)} ms)",
        )
    )
    rows.append(
        (
            "context cache: same input, 2nd (hit)",
            statistics.median(hit),
            f"VAE enc {enc[1]}; saves {saved:.1f} ms per edit (median of pairwise differences); "
            f"stats: +{dh} hits, +{dm} misses over {1 + args.runs} pairs (min–max {spread(hit)} ms)",
        )
    )
    print(
        f"cache: miss {statistics.median(miss):.1f} ms, hit {statistics.median(hit):.1f} ms, saved {saved:.1f} ms, "
        f"+{dh} hits +{dm} misses",
        flush=True,
    )

    # LoRA, on a second engine loaded from a saved copy (same weights).
    with tempfile.TemporaryDirectory(prefix="kontext-bench-lora-") as tmp:
        t0 = time.perf_counter()
        KontextEngine.tiny("cpu").save(Path(tmp) / "kontext-tiny")
        lora_engine = KontextEngine.from_dir(Path(tmp) / "kontext-tiny", name="tiny-lora", device="cpu")
        print(f"saved + loaded the LoRA engine in {time.perf_counter() - t0:.2f}s", flush=True)
        lb = Bench(lora_engine, args.runs)
        own = case("LoRA engine, before any adapter (check: = baseline edit)", lb, edit)
        adir = Path(tmp) / "loras"
        adir.mkdir()
        n_new = args.runs + 1
        files = [write_lora(lora_engine, adir / f"a{i}.safetensors", i) for i in range(2 + n_new)]
        a, b = files[0], files[1]
        adapters = lora_engine.adapters

        peft_loaded = "peft" in sys.modules
        t0 = time.perf_counter()
        adapters.activate([LoraSpec(a, 1.0)])  # the very first load in the process
        very_first = (time.perf_counter() - t0) * 1000
        adapters.activate([LoraSpec(b, 1.0)])
        loads = []
        for path in files[2:]:  # new files; past MAX_ADAPTERS each load also deletes the least recently used
            t0 = time.perf_counter()
            adapters.activate([LoraSpec(path, 1.0)])
            loads.append((time.perf_counter() - t0) * 1000)
        # put a and b back as the two most recently used (they may have been evicted above)
        adapters.activate([LoraSpec(a, 1.0), LoraSpec(b, 1.0)])
        rows.append(
            (
                "LoRA: first load of an adapter (activate only)",
                statistics.median(loads),
                f"{len(loads)} new files, rank {RANK} on {len(LORA_MODULES)} layers; the very first in the "
                f"process: {very_first:.0f} ms (peft {'already' if peft_loaded else 'not yet'} imported); "
                f"loaded now: {len(adapters.loaded)} "
                f"(max {adapters.max_adapters}) (min–max {spread(loads)} ms)",
            )
        )
        print(f"LoRA first load: {statistics.median(loads):.1f} ms (very first {very_first:.0f} ms)", flush=True)

        loads0 = adapters.loads
        case("LoRA: 1 adapter, scale 1", lb, dict(edit, loras=[LoraSpec(a, 1.0)]))
        case("LoRA: 2 adapters, scale 1 each", lb, dict(edit, loras=[LoraSpec(a, 1.0), LoraSpec(b, 1.0)]))
        flip = itertools.count()
        switch = [LoraSpec(a, 1.0)], [LoraSpec(b, 1.0)]
        before = adapters.loads
        times = lb.time(lambda: lora_engine.run(**dict(edit, loras=switch[next(flip) % 2])))
        rows.append(
            (
                "LoRA: switching a/b every request",
                statistics.median(times),
                f"adapter reads from disk while switching: {adapters.loads - before} (min–max {spread(times)} ms)",
            )
        )
        print(f"LoRA switching: {statistics.median(times):.1f} ms", flush=True)
        case("LoRA: 1 adapter, scale 0", lb, dict(edit, loras=[LoraSpec(a, 0.0)]))
        case("no LoRA, on the engine that has adapters loaded", lb, edit, "adapters disabled, PEFT layers stay")
        rows.append(("(adapter reads from disk in the four request rows above)", None, f"{adapters.loads - loads0}"))

    print(f"\nmachine: {machine()}")
    print("\n| feature | ms p50 | x baseline edit | notes |")
    print("|---|---:|---:|---|")
    for name, ms, notes in rows:
        if ms is None:
            print(f"| {name} | | | {notes} |")
            continue
        ratio = "—" if name.startswith("LoRA: first load") else f"{ms / ref['edit']:.2f}"
        print(f"| {name} | {ms:.1f} | {ratio} | {notes} |")
    print(
        f"\nbaseline edit - text-to-image = {ref['edit'] - ref['t2i']:.1f} ms; LoRA engine's own baseline {own:.1f} ms"
    )
    print(f"\n{watch.report()}")


if __name__ == "__main__":
    main()
