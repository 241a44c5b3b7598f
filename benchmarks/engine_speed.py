"""Speed of the FLUX.1 Kontext transformer: diffusers eager against each acceleration mode of the lean one.

One process builds a FluxKontextPipeline with random weights (the real 12B architecture by default on
CUDA), times diffusers' own FluxTransformer2DModel first, then converts the same weights to the lean
transformer, frees the diffusers copy, and times the lean modes:

  diffusers  diffusers' FluxTransformer2DModel, eager, in --dtype
  none       the lean transformer, exact (same maths as diffusers)
  regular    fp8 block linears (where the device runs fp8)
  high       fp8 and the step cache (13 of 28 steps computed)

for an edit (one context image the size of the output) and a text-to-image at --size, --steps steps,
guidance 2.5, the VAE decode included. Text encoders are not run: the prompt is a random T5/CLIP
embedding (512 tokens), and the edit's input image is a random 16-channel latent that the pipeline
uses as is (so no VAE encode).

Per task and mode it prints the median seconds per image over --repeats runs (after one warm-up run),
the denoising part of it, the effective TFLOP/s (the transformer FLOP of every step, also of the steps
the step cache skips, divided by the seconds per image), the ratio to the physical floor (that FLOP
count at the GPU's dense peak: bf16, or fp8 for the fp8 modes), the peak GPU memory, how far the image
is from the lean `none` image (PSNR of the decoded pixels, relative L2 of the final latents; on random
weights these only rank the modes), and how many transformer passes ran.

Configs: `real` is FLUX.1 [dev] (12B; converting it briefly holds two bf16 copies, ~45 GiB of GPU
memory); `medium` keeps the real head size (128) with 6 blocks of width 512; `small` is a toy for a CPU
check. The default is `real` on CUDA and `small` on the CPU. On the CPU the fp8 modes run PyTorch's
reference fp8 kernel (the engine itself skips fp8 there): they show fidelity, not speed. The step cache
skips steps only from 7 steps on.

Examples:
  .venv/bin/python benchmarks/engine_speed.py                        # CPU: small config, about 25 s
  python benchmarks/engine_speed.py --json speed.json                 # GPU: 12B, 1024x1024, 28 steps
  python benchmarks/engine_speed.py --config medium --size 256 --steps 2 --vae small
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from common import CpuWatch, machine
from kontext_gateway.engine.lean.adapter import LeanTransformer
from kontext_gateway.engine.lean.attention import BACKENDS
from kontext_gateway.engine.lean.model import FluxConfig
from kontext_gateway.engine.lean.weights import from_diffusers_model

MODES = ("diffusers", "none", "regular", "high")
TASKS = ("edit", "t2i")
TEXT_TOKENS = 512  # T5 sequence length, as the real pipeline pads it
GUIDANCE = 2.5
SEED = 0


@dataclass(frozen=True)
class Preset:
    flux: FluxConfig
    vae: str  # key of VAES
    size: int
    steps: int


PRESETS = {
    "real": Preset(FluxConfig(), vae="flux", size=1024, steps=28),
    # The real head size (128, so the real RoPE axes and attention kernels), far fewer and narrower blocks.
    "medium": Preset(
        FluxConfig(hidden_size=512, num_heads=4, depth=2, depth_single=4, context_dim=512),
        vae="flux",
        size=512,
        steps=28,
    ),
    # 8 steps so that the step cache skips some (it always computes the first and the last 3).
    "small": Preset(
        FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single=2, context_dim=256, vec_dim=256),
        vae="small",
        size=256,
        steps=8,
    ),
}

_VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    sample_size=1024,
)
VAES = {
    "flux": dict(_VAE_COMMON, block_out_channels=(128, 256, 512, 512), layers_per_block=2),  # FLUX.1's VAE
    # Same downsampling (8x) and latent channels, a fraction of the convolution work.
    "small": dict(
        _VAE_COMMON,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
    ),
}

# Dense peaks (TFLOP/s) of the data-centre Hopper parts: (bf16, fp8). Checked in this order.
PEAKS = (
    ("H100 PCIe", (756.0, 1513.0)),
    ("H100 NVL", (835.0, 1671.0)),
    ("H200 NVL", (835.0, 1671.0)),
    ("H100", (989.0, 1979.0)),
    ("H200", (989.0, 1979.0)),
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=PRESETS, help="model size (default: real on CUDA, small on the CPU)")
    ap.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", choices=DTYPES, help="weights and activations (default: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument(
        "--size",
        type=int,
        help="square output side in pixels, a multiple of 16 (default: 1024 real, 512 medium, 256 small)",
    )
    ap.add_argument("--steps", type=int, help="denoising steps (default: 28; 8 for small)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)} (default: all)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default: all)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per task and mode, after one warm-up (default 3)"
    )
    ap.add_argument("--vae", choices=VAES, help="VAE size (default: flux for real and medium, small for small)")
    ap.add_argument(
        "--attention",
        choices=BACKENDS,
        default="auto",
        help="the lean model's attention kernel (default auto: the fastest the device has)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        help="dense bf16 peak of the device for the floor (default: known for H100/H200; otherwise no floor)",
    )
    ap.add_argument("--peak-fp8-tflops", type=float, help="dense fp8 peak (default: twice --peak-tflops)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the lean blocks (KONTEXT_ENGINE_COMPILE); warm-up runs absorb the compile",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results there")
    args = ap.parse_args()

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    args.config = args.config or ("real" if cuda else "small")
    preset = PRESETS[args.config]
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.size = args.size or preset.size
    args.steps = args.steps or preset.steps
    args.vae = args.vae or preset.vae
    args.tasks = _choices(args.tasks, TASKS, ap)
    args.modes = _choices(args.modes, MODES, ap)
    if args.size % 16:
        ap.error("--size must be a multiple of 16 (8x VAE, then 2x2 patches)")
    return args


def _choices(text: str, allowed: tuple[str, ...], ap: argparse.ArgumentParser) -> list[str]:
    picked = [t.strip() for t in text.split(",") if t.strip()]
    if bad := [t for t in picked if t not in allowed]:
        ap.error(f"unknown {bad}: pick from {', '.join(allowed)}")
    return [t for t in allowed if t in picked]  # always in the canonical order (diffusers first)


# --------------------------------------------------------------------------------------------------
# The pipeline on random weights


def fill_random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights, drawn where the parameters are: matrices N(0, 1/fan_in) (keeps activations
    at scale through any width), biases 0, norm scales 1."""
    device = next(module.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return module


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside get `dtype` parameters from the start. Building in fp32 and casting would, on
    CUDA, briefly hold the 12B model in fp32 (48 GB) next to its bf16 copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_transformer(cfg: FluxConfig, device: str, dtype: torch.dtype) -> Any:
    """diffusers' FluxTransformer2DModel built straight on `device`: on the meta device first, so 12B
    parameters are never initialised on the CPU."""
    from diffusers import FluxTransformer2DModel

    with default_dtype(dtype), torch.device("meta"):
        model = FluxTransformer2DModel(**cfg.to_diffusers())
    return fill_random_(model.to_empty(device=device), SEED).eval()


def build_pipeline(transformer: Any, vae: str, device: str, dtype: torch.dtype) -> Any:
    """FluxKontextPipeline without text encoders: prompts come in as embeddings."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    with torch.random.fork_rng(devices=[]), default_dtype(dtype):
        torch.manual_seed(SEED)
        autoencoder = AutoencoderKL(**VAES[vae]).to(device).eval()  # PyTorch's default init, on the CPU
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=autoencoder,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def swap_to_lean(pipe: Any, attention: str, device: str, compile: bool) -> str:
    """Put the lean transformer on the same weights in the pipeline, the diffusers copy freed before
    anything else runs. Returns the attention kernel it picked."""
    lean = from_diffusers_model(pipe.transformer)
    pipe.transformer = None
    free_memory(device)
    name = lean.use_attention(attention, device=device)
    if compile:
        lean.compile_blocks()  # compiled during each task's warm-up run
    adapter = LeanTransformer(lean)
    # The CPU runs fp8 correctly but slower than fp32 (the engine skips it there); here it shows fidelity.
    adapter.fp8_on_cpu = not device.startswith("cuda")
    pipe.register_modules(transformer=adapter)
    return name + (" + compiled blocks" if compile else "")


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Inputs and one timed image


@dataclass
class Task:
    name: str
    kwargs: dict[str, Any]  # for the pipeline call (all but the generator)
    tokens: int  # transformer sequence length: text + noise (+ context)


def make_tasks(names: list[str], cfg: FluxConfig, size: int, steps: int, device: str, dtype: torch.dtype) -> list[Task]:
    gen = torch.Generator("cpu").manual_seed(SEED)  # CPU draws: the same inputs on every device
    embeds = torch.randn(1, TEXT_TOKENS, cfg.context_dim, generator=gen).to(device, dtype)
    pooled = torch.randn(1, cfg.vec_dim, generator=gen).to(device, dtype)
    context = torch.randn(1, 16, size // 8, size // 8, generator=gen).to(device, dtype)
    noise_tokens = (size // 16) ** 2
    common = dict(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        height=size,
        width=size,
        max_area=size * size,  # else diffusers rescales the output to 1024^2
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        output_type="np",
    )
    tasks = {
        "edit": Task("edit", dict(common, image=context, _auto_resize=False), TEXT_TOKENS + 2 * noise_tokens),
        "t2i": Task("t2i", common, TEXT_TOKENS + noise_tokens),
    }
    return [tasks[n] for n in names]


@dataclass
class Run:
    seconds: float
    denoise_seconds: float
    image: np.ndarray  # decoded, (H, W, 3) in [0, 1]
    latents: torch.Tensor  # final packed latents, fp32 on the CPU


def run_once(pipe: Any, task: Task, sync: Any) -> Run:
    """One image; the denoising time ends at the last step's callback (the scheduler step done)."""
    marks: dict[str, Any] = {}
    steps = task.kwargs["num_inference_steps"]

    def on_step(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == steps - 1:
            sync()
            marks["denoised"] = time.perf_counter()
            marks["latents"] = kwargs["latents"].float().cpu()
        return {}

    sync()
    t0 = time.perf_counter()
    out = pipe(**task.kwargs, generator=torch.Generator("cpu").manual_seed(SEED), callback_on_step_end=on_step)
    sync()
    seconds = time.perf_counter() - t0
    return Run(seconds, marks["denoised"] - t0, out.images[0], marks["latents"])


# --------------------------------------------------------------------------------------------------
# One mode: warm-up, timed runs, memory


@dataclass
class Row:
    task: str
    mode: str
    seconds: float  # median per image
    denoise_seconds: float
    seconds_all: list[float]
    tflop: float  # transformer FLOP of all steps, in TFLOP
    peak_memory_gib: float | None
    computed: int  # transformer passes that ran
    calls: int
    applied: list[str]
    attention: str
    finite: bool = True  # no NaN/inf in the image or latents
    # filled in once every mode has run
    psnr_db: float | None = None  # vs lean "none"
    latent_rel_l2: float | None = None
    tflops_effective: float = 0.0
    floor_seconds: float | None = None
    x_floor: float | None = None
    run: Run | None = field(default=None, repr=False)


def measure(pipe: Any, task: Task, mode: str, args: argparse.Namespace, cfg: FluxConfig, attention: str) -> Row:
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs, stats = [], None
    with torch.inference_mode():
        for _ in range(1 + args.repeats):  # the first is the warm-up (and, for fp8, makes the fp8 weights)
            if mode == "diffusers":
                runs.append(run_once(pipe, task, sync))
            else:
                with pipe.transformer.request(pipe.scheduler, mode) as stats:
                    runs.append(run_once(pipe, task, sync))
    timed = runs[1:] or runs
    last = timed[-1]
    computed, calls = (stats.computed, stats.calls) if stats else (args.steps, args.steps)
    return Row(
        task=task.name,
        mode=mode,
        seconds=statistics.median(r.seconds for r in timed),
        denoise_seconds=statistics.median(r.denoise_seconds for r in timed),
        seconds_all=[round(r.seconds, 4) for r in timed],
        tflop=args.steps * cfg.flops_per_step(task.tokens) / 1e12,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        computed=computed,
        calls=calls,
        applied=list(stats.applied) if stats else [],
        attention="diffusers sdpa" if mode == "diffusers" else attention,
        finite=bool(np.isfinite(last.image).all() and torch.isfinite(last.latents).all()),
        run=last,
    )


# --------------------------------------------------------------------------------------------------
# Report


def peak_tflops(args: argparse.Namespace) -> tuple[float, float] | None:
    """(bf16, fp8) dense peaks, from the flags or the GPU's name; None where unknown (then no floor)."""
    if args.peak_tflops:
        return args.peak_tflops, args.peak_fp8_tflops or 2 * args.peak_tflops
    if not args.device.startswith("cuda") or args.dtype != "bf16":
        return None
    name = torch.cuda.get_device_name(args.device)
    return next((peaks for key, peaks in PEAKS if key in name), None)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def compare(rows: list[Row]) -> None:
    """Each row against the lean `none` row of its task."""
    refs = {r.task: r.run for r in rows if r.mode == "none"}
    for r in rows:
        ref = refs.get(r.task)
        if ref is None or r.mode == "none" or r.run is None:
            continue
        r.psnr_db = psnr(r.run.image, ref.image)
        r.latent_rel_l2 = float((r.run.latents - ref.latents).norm() / ref.latents.norm())


def add_rates(rows: list[Row], peaks: tuple[float, float] | None) -> None:
    """Effective TFLOP/s, and the floor: all the FLOP at the dense peak of the precision the linears ran in."""
    for r in rows:
        r.tflops_effective = r.tflop / r.seconds
        if peaks is not None:
            r.floor_seconds = r.tflop / (peaks[1] if "fp8" in r.applied else peaks[0])
            r.x_floor = r.seconds / r.floor_seconds


def table(rows: list[Row]) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else ("inf" if value == math.inf else format(value, fmt))

    lines = [
        "| task | mode | s/image | denoise s | TFLOP/s eff | x floor | peak mem GiB | PSNR vs none dB "
        "| latent rel-L2 vs none | passes computed | applied |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        vs_none = ("ref", "ref") if r.mode == "none" else (num(r.psnr_db, ".1f"), num(r.latent_rel_l2, ".2e"))
        lines.append(
            f"| {r.task} | {r.mode} | {r.seconds:.3f} | {r.denoise_seconds:.3f} | {r.tflops_effective:.3g} | "
            f"{num(r.x_floor, '.2f')} | {num(r.peak_memory_gib, '.2f')} | {vs_none[0]} | {vs_none[1]} | "
            f"{r.computed}/{r.calls} | {', '.join(r.applied) or '-'}{'' if r.finite else ' NON-FINITE OUTPUT'} |"
        )
    return "\n".join(lines)


def machine_line(args: argparse.Namespace) -> str:
    import diffusers

    device = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} torch threads"
    )
    return (
        f"device: {device}\nmachine: {machine()}\ntorch {torch.__version__}, diffusers {diffusers.__version__}\n"
        f"command: {' '.join([sys.executable, *sys.argv])}"
    )


def main() -> None:
    args = parse_args()
    print(machine_line(args), flush=True)
    watch = CpuWatch()
    cfg, dtype = PRESETS[args.config].flux, DTYPES[args.dtype]
    t0 = time.perf_counter()
    pipe = build_pipeline(random_transformer(cfg, args.device, dtype), args.vae, args.device, dtype)
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    print(
        f"config {args.config}: {params:.3f}B parameters, hidden {cfg.hidden_size}, {cfg.depth}+{cfg.depth_single} "
        f"blocks, {args.dtype} on {args.device}, {args.size}x{args.size}, {args.steps} steps, VAE {args.vae}, "
        f"{args.repeats} timed runs after 1 warm-up; random pipeline built in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    tasks = make_tasks(args.tasks, cfg, args.size, args.steps, args.device, dtype)

    rows: list[Row] = []
    attention = "sdpa"
    for mode in args.modes:
        if mode != "diffusers" and not isinstance(pipe.transformer, LeanTransformer):
            t0 = time.perf_counter()
            attention = swap_to_lean(pipe, args.attention, args.device, args.compile)
            print(f"converted to lean ({attention} attention) in {time.perf_counter() - t0:.1f}s", flush=True)
        for task in tasks:
            rows.append(measure(pipe, task, mode, args, cfg, attention))
            r = rows[-1]
            print(
                f"{task.name} {mode}: {r.seconds:.3f}s/image (denoise {r.denoise_seconds:.3f}s), "
                f"{r.computed}/{r.calls} passes, runs {r.seconds_all}",
                flush=True,
            )
        free_memory(args.device)

    compare(rows)
    peaks = peak_tflops(args)
    add_rates(rows, peaks)
    floor_note = (
        f"floor at {peaks[0]:g} (bf16) / {peaks[1]:g} (fp8) TFLOP/s dense"
        if peaks
        else "no floor: peak unknown for this device/dtype (--peak-tflops)"
    )
    rss = (
        f", process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        if not args.device.startswith("cuda")
        else ""
    )
    print(
        "\nsequence lengths: "
        + ", ".join(f"{t.name} {t.tokens} tokens" for t in tasks)
        + f"; {floor_note}; lean attention: {attention}{rss}\n"
    )
    print(table(rows))
    print(f"\n{watch.report()}")
    if args.json:
        result = dict(
            machine=machine_line(args),
            args=vars(args),
            config=asdict(cfg),
            rows=[{f.name: getattr(r, f.name) for f in fields(r) if f.name != "run"} for r in rows],
        )
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
