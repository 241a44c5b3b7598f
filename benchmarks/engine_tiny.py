"""In-process timing of the kontext-tiny engine (no server): build time, then the median of N runs of
text-to-image and edit at each size (edit: input image the size of the output, context = output size).
Targets on a 2-core CPU: 256x256 edit < 1 s, 1024x1024 edit < 10 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

from PIL import Image

from common import CpuWatch, machine

TARGETS_S = {256: 1.0, 1024: 10.0}  # edit, by side


def input_image(side: int) -> Image.Image:
    """A deterministic, non-flat RGB picture (gradients), so the VAE sees real structure."""
    im = Image.linear_gradient("L").resize((side, side))
    return Image.merge("RGB", (im, im.rotate(90), im.rotate(180)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="square sides (default 256 1024)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per case (default 3)")
    ap.add_argument("--steps", type=int, default=4, help="inference steps (default 4, the tiny model's default)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    watch = CpuWatch()

    t0 = time.perf_counter()
    import torch

    from kontext_gateway.engine.pipeline import KontextEngine
    from kontext_gateway.params import Size

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = KontextEngine.tiny()
    t_build = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {engine.device}")
    print(f"import torch + engine: {t_import:.2f}s, KontextEngine.tiny(): {t_build:.2f}s")

    rows = []
    for side in args.sizes:
        size = Size(side, side)
        for mode in ("text-to-image", "edit"):
            image = input_image(side) if mode == "edit" else None
            kwargs = dict(
                prompt="a red fox in the snow",
                image=image,
                output=size,
                context=size if image else None,
                steps=args.steps,
                guidance=2.5,
                n=1,
                seed=0,
            )
            t0 = time.perf_counter()
            engine.run(**kwargs)  # first call at a size: allocator / kernel warm-up
            first = time.perf_counter() - t0
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                engine.run(**kwargs)
                times.append(time.perf_counter() - t0)
            rows.append((side, mode, first, statistics.median(times), min(times), max(times)))
            print(f"{size} {mode}: first {first:.3f}s, median {rows[-1][3]:.3f}s", flush=True)

    print()
    print(f"| size | mode | first run s | median of {args.runs} s | min s | max s | target | |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for side, mode, first, med, lo, hi in rows:
        target = TARGETS_S.get(side) if mode == "edit" else None
        verdict = "" if target is None else ("met" if med < target else "NOT met")
        print(
            f"| {side}x{side} | {mode} | {first:.3f} | {med:.3f} | {lo:.3f} | {hi:.3f} | "
            f"{f'< {target:g} s' if target else ''} | {verdict} |"
        )
    print(f"\n{watch.report()}")


if __name__ == "__main__":
    main()
