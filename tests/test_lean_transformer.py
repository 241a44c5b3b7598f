"""The lean transformer equals diffusers' FluxTransformer2DModel (the reference) on the same random weights.

The protocol: fp32 within 1e-5 relative L2; in bf16 the
lean model's error against the fp32 reference is at most 1.5x the reference's own bf16-vs-fp32 error.
Checked block by block (teacher forcing: identical inputs into each block), for the whole model over
several steps, and for the whole pipeline with fixed latents and embeddings. Two configurations: the
tiny model the gateway serves, and a medium one with FLUX.1's real head size (128) and RoPE axes.
The real 12B configuration is checked the same way on a GPU (benchmarks/engine_speed.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxKontextPipeline, FluxTransformer2DModel

from kontext_gateway.engine.lean.adapter import LeanTransformer
from kontext_gateway.engine.lean.attention import sdpa
from kontext_gateway.engine.lean.model import FluxConfig, rope_tables
from kontext_gateway.engine.lean.weights import (
    diffusers_name,
    from_bfl_file,
    from_diffusers_dir,
    from_diffusers_model,
    save_bfl_file,
)

FP32_TOL = 1e-5
BF16_RATIO = 1.5

MEDIUM = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=128,
    num_attention_heads=4,
    joint_attention_dim=256,
    pooled_projection_dim=128,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_reference() -> FluxTransformer2DModel:
    from kontext_gateway.engine.tiny import build_tiny_pipeline

    return build_tiny_pipeline().transformer.float().eval()


def medium_reference() -> FluxTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return FluxTransformer2DModel(**MEDIUM).eval()


@pytest.fixture(scope="module", params=["tiny", "medium"])
def reference(request: pytest.FixtureRequest) -> FluxTransformer2DModel:
    return tiny_reference() if request.param == "tiny" else medium_reference()


class Inputs:
    """A Kontext edit's inputs: 2 images in a batch, text tokens, 8x8 noise tokens, 8x8 context tokens."""

    def __init__(self, ref: FluxTransformer2DModel, batch: int = 2, text: int = 24, side: int = 8) -> None:
        cfg = ref.config
        g = torch.Generator().manual_seed(5)
        self.noise = side * side
        self.txt = torch.randn(batch, text, cfg.joint_attention_dim, generator=g)
        self.pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
        self.tokens = torch.randn(batch, 2 * self.noise, cfg.in_channels, generator=g)
        self.txt_ids = torch.zeros(text, 3)
        grid = torch.zeros(side, side, 3)
        grid[..., 1] = torch.arange(side)[:, None]
        grid[..., 2] = torch.arange(side)[None, :]
        ctx = grid.clone()
        ctx[..., 0] = 1  # Kontext: context tokens are the noise grid with axis 0 = 1
        self.img_ids = torch.cat([grid.reshape(-1, 3), ctx.reshape(-1, 3)])
        self.sigmas = torch.tensor([1.0, 0.83, 0.52, 0.2])
        self.guidance = torch.full([batch], 2.5)

    def reference_velocity(self, ref: FluxTransformer2DModel, step: int, dtype: torch.dtype) -> torch.Tensor:
        b = self.tokens.shape[0]
        out = ref(
            hidden_states=self.tokens.to(dtype),
            encoder_hidden_states=self.txt.to(dtype),
            pooled_projections=self.pooled.to(dtype),
            timestep=self.sigmas[step].expand(b).to(dtype),
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            guidance=self.guidance,
            return_dict=False,
        )[0]
        return out[:, : self.noise]

    def lean_velocities(self, lean, dtype: torch.dtype) -> list[torch.Tensor]:
        plan = lean.plan(
            txt=self.txt.to(dtype),
            pooled=self.pooled.to(dtype),
            timesteps=self.sigmas.to(dtype) * 1000,
            guidance=self.guidance.to(dtype) * 1000,
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            noise_tokens=self.noise,
        )
        return [lean(self.tokens.to(dtype), plan, s) for s in range(len(self.sigmas))]


# ---------------------------------------------------------------------------------------------------
# Weights and layout


def test_every_diffusers_parameter_has_one_place_in_the_fused_layout(reference) -> None:
    lean = from_diffusers_model(reference)
    cfg = lean.config
    own = dict(lean.named_parameters())
    # Every fused tensor is covered by its parts exactly (from_diffusers_model checks the row counts);
    # here: each diffusers tensor equals its rows in the lean model.
    for name, param in reference.named_parameters():
        target, rows, swap = diffusers_name(name, cfg)
        got = own[target].data if rows is None else own[target].data[rows]
        want = torch.cat(param.data.chunk(2)[::-1]) if swap else param.data
        assert torch.equal(got, want), name
    assert sum(p.numel() for p in lean.parameters()) == sum(p.numel() for p in reference.parameters())


def test_bfl_single_file_and_diffusers_folder_load_the_same_model(tmp_path: Path) -> None:
    ref = medium_reference()
    lean = from_diffusers_model(ref)
    save_bfl_file(lean, tmp_path / "flux1-kontext-dev.safetensors")
    from_file = from_bfl_file(tmp_path / "flux1-kontext-dev.safetensors", dtype=torch.float32)
    assert from_file.config == lean.config  # architecture read off the shapes
    ref.save_pretrained(tmp_path / "pipe" / "transformer")  # diffusers layout, as in a pipeline folder
    from_dir = from_diffusers_dir(tmp_path / "pipe", dtype=torch.float32)
    for (name, a), (_, b), (_, c) in zip(
        lean.named_parameters(), from_file.named_parameters(), from_dir.named_parameters(), strict=False
    ):
        assert torch.equal(a, b) and torch.equal(a, c), name

    # ComfyUI saves the same tensors under a prefix.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "flux1-kontext-dev.safetensors"))
    save_file({f"model.diffusion_model.{k}": v for k, v in tensors.items()}, str(tmp_path / "comfy.safetensors"))
    assert torch.equal(
        from_bfl_file(tmp_path / "comfy.safetensors", dtype=torch.float32).img_in.weight, lean.img_in.weight
    )

    # A truncated file is refused with the names it lacks, not loaded half-initialised.
    save_file({k: v for k, v in tensors.items() if "single_blocks.1." not in k}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match=r"lacks|missing"):
        from_bfl_file(tmp_path / "cut.safetensors", dtype=torch.float32, config=lean.config)


def test_our_bfl_layout_is_the_one_diffusers_converts_from() -> None:
    """diffusers' own BFL converter (fixed to FLUX.1's width 3072) turns our BFL state dict back into the
    reference's exact tensors: the fused row order, the linear1 split and the final-layer swap agree."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    kwargs = dict(
        MEDIUM,
        num_attention_heads=24,
        num_layers=1,
        num_single_layers=1,
        joint_attention_dim=64,
        pooled_projection_dim=64,
    )
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**kwargs)
    ref = ref.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    lean = from_diffusers_model(ref)
    converted = convert_flux_transformer_checkpoint_to_diffusers({n: p.data for n, p in lean.named_parameters()})
    original = dict(ref.named_parameters())
    assert set(converted) == set(original)
    for name, tensor in converted.items():
        assert torch.equal(tensor, original[name].data), name


# ---------------------------------------------------------------------------------------------------
# Blocks under teacher forcing


def _block_inputs(ref: FluxTransformer2DModel, inputs: Inputs) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    b, lt, li, h = inputs.tokens.shape[0], inputs.txt.shape[1], inputs.tokens.shape[1], ref.inner_dim
    return {
        "img": torch.randn(b, li, h, generator=g),
        "txt": torch.randn(b, lt, h, generator=g),
        "temb": torch.randn(b, h, generator=g),
    }


def _run_blocks(ref, lean, inputs: Inputs, x: dict[str, torch.Tensor], dtype: torch.dtype) -> list[tuple]:
    """(reference output, lean output) for every block, inputs identical (cast to `dtype`)."""
    ids = torch.cat([inputs.txt_ids, inputs.img_ids])
    rope_ref = ref.pos_embed(ids)
    rope = rope_tables(ids, lean.config.axes_dim, lean.config.theta)
    img, txt, temb = (x[k].to(dtype) for k in ("img", "txt", "temb"))
    silu = F.silu(temb)
    pairs = []
    for rb, lb in zip(ref.transformer_blocks, lean.double_blocks, strict=False):
        r_txt, r_img = rb(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope_ref)
        l_img, l_txt = lb(img, txt, lb.img_mod(silu), lb.txt_mod(silu), rope, sdpa)
        pairs.append((torch.cat([r_txt, r_img], 1), torch.cat([l_txt, l_img], 1)))
    for rb, lb in zip(ref.single_transformer_blocks, lean.single_blocks, strict=False):
        r_txt, r_img = rb(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope_ref)
        out = lb(torch.cat([txt, img], 1), lb.modulation(silu), rope, sdpa)
        pairs.append((torch.cat([r_txt, r_img], 1), out))
        # The last block's short cut: only the noise rows, the same values.
        kept = lb(
            torch.cat([txt, img], 1),
            lb.modulation(silu),
            rope,
            sdpa,
            rows=slice(txt.shape[1], txt.shape[1] + inputs.noise),
        )
        pairs.append((r_img[:, : inputs.noise], kept))
    return pairs


@torch.inference_mode()
def test_each_block_matches_in_fp32(reference) -> None:
    lean = from_diffusers_model(reference)
    inputs = Inputs(reference)
    for i, (want, got) in enumerate(
        _run_blocks(reference, lean, inputs, _block_inputs(reference, inputs), torch.float32)
    ):
        assert torch.isfinite(got).all()
        assert rel(got, want) <= FP32_TOL, f"block output {i}: {rel(got, want)}"


@torch.inference_mode()
def test_each_block_in_bf16_is_as_close_to_fp32_as_the_reference_in_bf16(reference) -> None:
    inputs = Inputs(reference)
    x = _block_inputs(reference, inputs)
    exact = [want for want, _ in _run_blocks(reference, from_diffusers_model(reference), inputs, x, torch.float32)]
    ref16 = copy.deepcopy(reference).to(torch.bfloat16)
    lean16 = from_diffusers_model(reference, dtype=torch.bfloat16)
    for i, ((ref_out, lean_out), fp32) in enumerate(
        zip(_run_blocks(ref16, lean16, inputs, x, torch.bfloat16), exact, strict=False)
    ):
        ref_err, lean_err = rel(ref_out, fp32), rel(lean_out, fp32)
        assert 0 < ref_err < 0.05  # bf16 does round: the ratio below compares like with like
        assert lean_err <= BF16_RATIO * ref_err, f"block output {i}: lean {lean_err:.2e} vs reference {ref_err:.2e}"


# ---------------------------------------------------------------------------------------------------
# The whole model, several steps from one plan


@torch.inference_mode()
def test_whole_model_matches_in_fp32_at_every_step(reference) -> None:
    lean = from_diffusers_model(reference)
    inputs = Inputs(reference)
    for step, got in enumerate(inputs.lean_velocities(lean, torch.float32)):
        want = inputs.reference_velocity(reference, step, torch.float32)
        assert got.shape == want.shape == (2, inputs.noise, reference.config.in_channels)
        assert rel(got, want) <= FP32_TOL, f"step {step}: {rel(got, want)}"


@torch.inference_mode()
def test_whole_model_bf16_error_is_within_the_reference_s_own(reference) -> None:
    inputs = Inputs(reference)
    ref16 = copy.deepcopy(reference).to(torch.bfloat16)
    lean16 = from_diffusers_model(reference, dtype=torch.bfloat16)
    for step, got in enumerate(inputs.lean_velocities(lean16, torch.bfloat16)):
        fp32 = inputs.reference_velocity(reference, step, torch.float32)
        ref_err = rel(inputs.reference_velocity(ref16, step, torch.bfloat16), fp32)
        assert rel(got, fp32) <= BF16_RATIO * ref_err, f"step {step}: {rel(got, fp32):.2e} vs {ref_err:.2e}"


# ---------------------------------------------------------------------------------------------------
# The whole pipeline, fixed latents and embeddings


def _pipeline(transformer) -> FluxKontextPipeline:
    from kontext_gateway.engine.tiny import build_tiny_pipeline

    parts = build_tiny_pipeline().components
    parts["transformer"] = transformer
    pipe = FluxKontextPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_output(
    pipe: FluxKontextPipeline,
    ref: FluxTransformer2DModel,
    dtype: torch.dtype,
    output_type: str = "latent",
    lean: bool = False,
) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    cfg = ref.config
    side = 128  # pixels: 16x16 latents, 64 noise + 64 context tokens
    kwargs = dict(
        image=torch.randn(1, 16, side // 8, side // 8, generator=g).to(dtype),  # 16 channels: used as latents
        prompt_embeds=torch.randn(1, 32, cfg.joint_attention_dim, generator=g).to(dtype),
        pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dtype),
        latents=torch.randn(1, (side // 16) ** 2, 64, generator=g).to(dtype),
        height=side,
        width=side,
        max_area=side * side,
        _auto_resize=False,
        num_inference_steps=4,
        guidance_scale=2.5,
        output_type=output_type,
    )
    pipe.to(dtype=dtype)
    with torch.inference_mode():
        if lean:
            with pipe.transformer.request(pipe.scheduler):
                out = pipe(**kwargs).images
        else:
            out = pipe(**kwargs).images
    return torch.as_tensor(out)


def test_pipeline_with_fixed_latents_and_embeddings_matches_in_fp32_and_bf16() -> None:
    ref = medium_reference()
    ref_pipe = _pipeline(ref)
    lean_pipe = _pipeline(LeanTransformer(from_diffusers_model(ref)))
    want = _pipeline_output(ref_pipe, ref, torch.float32)
    got = _pipeline_output(lean_pipe, ref, torch.float32, lean=True)
    assert got.shape == want.shape and rel(got, want) <= FP32_TOL
    # Decoded pixels too (the VAE is shared): the same picture.
    pixels_ref = _pipeline_output(ref_pipe, ref, torch.float32, "np")
    pixels = _pipeline_output(lean_pipe, ref, torch.float32, "np", lean=True)
    assert (pixels - pixels_ref).abs().max() < 1e-4
    # Outside a request (no plan for all steps), each call plans itself: the same result.
    assert rel(_pipeline_output(lean_pipe, ref, torch.float32), want) <= FP32_TOL

    ref16 = _pipeline_output(_pipeline(copy.deepcopy(ref)), ref, torch.bfloat16)
    lean_pipe16 = _pipeline(LeanTransformer(from_diffusers_model(ref, dtype=torch.bfloat16)))
    lean16 = _pipeline_output(lean_pipe16, ref, torch.bfloat16, lean=True)
    assert rel(lean16, want) <= BF16_RATIO * rel(ref16, want), (rel(lean16, want), rel(ref16, want))


@torch.inference_mode()
def test_compiled_blocks_compute_the_same_velocities() -> None:
    """KONTEXT_ENGINE_COMPILE: Inductor's fused kernels (here its CPU code) change nothing beyond
    rounding. A small width keeps the compile to seconds."""
    from kontext_gateway.engine.lean.model import LeanFluxTransformer

    ref = tiny_reference()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lean = LeanFluxTransformer(
            FluxConfig.from_diffusers(dict(ref.config, num_layers=1, num_single_layers=1))
        ).eval()
    inputs = Inputs(ref)
    eager = inputs.lean_velocities(lean, torch.float32)
    lean.compile_blocks()
    for got, want in zip(inputs.lean_velocities(lean, torch.float32), eager, strict=False):
        assert rel(got, want) <= FP32_TOL


def test_config_counts_the_reference_s_flops() -> None:
    """165.5 TFLOP per step for a 1024x1024 edit, 74.4 for text-to-image (reference section 5)."""
    cfg = FluxConfig()
    assert round(cfg.flops_per_step(512 + 4096 + 4096) / 1e12, 1) == 165.4
    assert round(cfg.flops_per_step(512 + 4096) / 1e12, 1) == 74.4
    assert FluxConfig.from_diffusers(cfg.to_diffusers()) == cfg
