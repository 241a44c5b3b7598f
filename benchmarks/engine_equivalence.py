"""The lean transformer against diffusers' FluxTransformer2DModel at any size, the real 12B one included.

tests/test_lean_transformer.py proves the equivalence on the CPU at the tiny and a medium configuration;
this script runs the same protocol where the 12B model fits (a GPU), with FLUX.1's real sequence
lengths (a 1024x1024 edit: 512 text + 4096 noise + 4096 context tokens):

- per block, under teacher forcing (identical random inputs into each block): the lean block in fp32
  within 1e-5 relative L2 of the reference's; in bf16 no further from the fp32 reference than
  1.5x the reference's own bf16 error. One block of each kind is built at a time, so any GPU fits.
- the whole model at one step (fp32 reference, then the bf16 lean model, then the reference cast to
  bf16): the same two tests on the velocity. Needs the fp32 model (48 GB) plus a bf16 copy (24 GB);
  `--skip-model` leaves it out on smaller GPUs.

Prints one line per check and exits 1 if any fails.

  python benchmarks/engine_equivalence.py                      # CUDA: real config; CPU: medium
  .venv/bin/python benchmarks/engine_equivalence.py --config medium --side 16
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
import torch.nn.functional as F

from kontext_gateway.engine.lean.attention import sdpa
from kontext_gateway.engine.lean.model import DoubleBlock, FluxConfig, SingleBlock, rope_tables
from kontext_gateway.engine.lean.weights import from_diffusers_model
from kontext_gateway.engine.pipeline import quiet_libraries

CONFIGS = {
    "real": FluxConfig(),
    "medium": FluxConfig(hidden_size=512, num_heads=4, depth=2, depth_single=2, context_dim=256, vec_dim=128),
}
FP32_TOL, BF16_RATIO = 1e-5, 1.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def fp32(self, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        err = rel(got, want)
        ok = err <= FP32_TOL and bool(torch.isfinite(got).all())
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {what:<34} fp32 rel-L2 {err:.2e} (limit {FP32_TOL:.0e})", flush=True)

    def bf16(self, what: str, lean: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor) -> None:
        lean_err, ref_err = rel(lean, exact), rel(ref, exact)
        ok = lean_err <= BF16_RATIO * ref_err and bool(torch.isfinite(lean).all())
        self.failed += not ok
        print(
            f"{'PASS' if ok else 'FAIL'}  {what:<34} bf16 error {lean_err:.2e} vs reference's {ref_err:.2e} "
            f"(ratio {lean_err / ref_err:.2f}, limit {BF16_RATIO})",
            flush=True,
        )


def ids(side: int, text: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(txt ids, image ids) of an edit: side x side noise tokens, then the context grid with axis 0 = 1."""
    grid = torch.zeros(side, side, 3)
    grid[..., 1] = torch.arange(side)[:, None]
    grid[..., 2] = torch.arange(side)[None, :]
    ctx = grid.clone()
    ctx[..., 0] = 1
    return torch.zeros(text, 3, device=device), torch.cat([grid.reshape(-1, 3), ctx.reshape(-1, 3)]).to(device)


def reference_block(kind: str, cfg: FluxConfig, device: str) -> torch.nn.Module:
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    cls = FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock
    with torch.device(device):
        return cls(dim=cfg.hidden_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim).eval()


def lean_block(kind: str, cfg: FluxConfig, ref: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The lean block with the reference block's weights, through the same name mapping as a whole model."""
    from kontext_gateway.engine.lean.weights import diffusers_name

    prefix = "transformer_blocks.0." if kind == "double" else "single_transformer_blocks.0."
    block = (DoubleBlock if kind == "double" else SingleBlock)(cfg).to(device=next(ref.parameters()).device)
    own = dict(block.named_parameters())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            target, rows, _ = diffusers_name(prefix + name, cfg)
            target = target.split(".", 2)[2]  # drop "double_blocks.0."
            (own[target].data if rows is None else own[target].data[rows]).copy_(p)
    return block.to(dtype).eval()


def run_block(kind: str, block: torch.nn.Module, lean: bool, x: dict, rope) -> torch.Tensor:
    img, txt, temb = x["img"], x["txt"], x["temb"]
    if not lean:
        t, i = block(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)
        return torch.cat([t, i], 1)
    silu = F.silu(temb)
    if kind == "double":
        i, t = block(img, txt, block.img_mod(silu), block.txt_mod(silu), rope, sdpa)
        return torch.cat([t, i], 1)
    return block(torch.cat([txt, img], 1), block.modulation(silu), rope, sdpa)


@torch.inference_mode()
def check_blocks(cfg: FluxConfig, side: int, text: int, device: str, report: Report) -> None:
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    txt_ids, img_ids = ids(side, text, device)
    all_ids = torch.cat([txt_ids, img_ids])
    rope_ref = FluxPosEmbed(theta=cfg.theta, axes_dim=list(cfg.axes_dim))(all_ids)
    rope = rope_tables(all_ids, cfg.axes_dim, cfg.theta)
    g = torch.Generator(device).manual_seed(0)
    x = {
        "img": torch.randn(1, img_ids.shape[0], cfg.hidden_size, generator=g, device=device),
        "txt": torch.randn(1, text, cfg.hidden_size, generator=g, device=device),
        "temb": torch.randn(1, cfg.hidden_size, generator=g, device=device),
    }
    x16 = {k: v.bfloat16() for k, v in x.items()}
    for kind in ("double", "single"):
        torch.manual_seed(1)
        ref = reference_block(kind, cfg, device)
        exact = run_block(kind, ref, False, x, rope_ref)
        report.fp32(f"{kind} block", run_block(kind, lean_block(kind, cfg, ref, torch.float32), True, x, rope), exact)
        lean16 = run_block(kind, lean_block(kind, cfg, ref, torch.bfloat16), True, x16, rope)
        report.bf16(f"{kind} block", lean16, run_block(kind, ref.bfloat16(), False, x16, rope_ref), exact)
        del ref
        gc.collect()


@torch.inference_mode()
def check_model(cfg: FluxConfig, side: int, text: int, device: str, report: Report) -> None:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(2)
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**cfg.to_diffusers())
    ref = ref.to_empty(device=device)
    with torch.no_grad():  # PyTorch's default init, as the CPU tests have it, drawn on the device
        for module in ref.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    ref.eval()
    txt_ids, img_ids = ids(side, text, device)
    g = torch.Generator(device).manual_seed(3)
    tokens = torch.randn(1, img_ids.shape[0], cfg.in_channels, generator=g, device=device)
    txt = torch.randn(1, text, cfg.context_dim, generator=g, device=device)
    pooled = torch.randn(1, cfg.vec_dim, generator=g, device=device)
    sigma, guidance, noise = torch.tensor([0.7], device=device), torch.tensor([2.5], device=device), side * side

    def reference(dtype: torch.dtype) -> torch.Tensor:
        return ref(
            hidden_states=tokens.to(dtype),
            encoder_hidden_states=txt.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=sigma.to(dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0][:, :noise]

    exact = reference(torch.float32)
    lean = from_diffusers_model(ref, dtype=torch.bfloat16)
    plan = lean.plan(
        txt=txt.bfloat16(),
        pooled=pooled.bfloat16(),
        timesteps=(sigma.bfloat16() * 1000),
        guidance=guidance.bfloat16() * 1000,
        txt_ids=txt_ids,
        img_ids=img_ids,
        noise_tokens=noise,
    )
    got = lean(tokens.bfloat16(), plan, 0)
    del lean, plan
    gc.collect()
    ref.to(torch.bfloat16)  # in place: the fp32 weights go
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    report.bf16("whole model, one step", got, reference(torch.bfloat16), exact)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIGS, help="default: real on CUDA, medium on the CPU")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument("--side", type=int, default=64, help="noise tokens per side (64: a 1024x1024 image)")
    ap.add_argument("--text", type=int, default=512, help="text tokens (T5: 512)")
    ap.add_argument("--skip-model", action="store_true", help="blocks only (the whole model needs ~72 GB at 12B)")
    args = ap.parse_args()
    quiet_libraries()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CONFIGS[args.config or ("real" if device.startswith("cuda") else "medium")]
    tokens = args.text + 2 * args.side**2
    print(
        f"{device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), "
        f"torch {torch.__version__}; "
        f"hidden {cfg.hidden_size}, {cfg.num_heads} heads of {cfg.head_dim}, {cfg.depth}+{cfg.depth_single} blocks; "
        f"{tokens} tokens",
        flush=True,
    )
    report = Report()
    check_blocks(cfg, args.side, args.text, device, report)
    if not args.skip_model:
        check_model(cfg, args.side, args.text, device, report)
    print("all checks passed" if not report.failed else f"{report.failed} check(s) FAILED")
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
