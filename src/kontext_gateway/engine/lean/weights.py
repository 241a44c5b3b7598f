"""Loading the lean transformer from the weights people have on disk.

- diffusers layout: a `transformer/` folder (config.json + safetensors shards), as in a FluxKontextPipeline
  directory. Separate q/k/v (and the single blocks' `proj_mlp`) are concatenated into the fused layout,
  and `norm_out`'s (scale, shift) becomes `final_layer`'s (shift, scale), as diffusers' own converter
  (scripts/convert_flux_to_diffusers.py) does the other way.
- BFL single file (`flux1-kontext-dev.safetensors`): our parameter names are BFL's, so it loads as is
  (a ComfyUI `model.diffusion_model.` prefix is stripped); the architecture is read off the shapes.

Tensors are converted one at a time and cast to the target dtype as they are placed, so peak host memory
stays near one copy of the weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .model import FluxConfig, LeanFluxTransformer

# diffusers name (within a block) -> (BFL name, part index among the fused parts, number of parts)
_DOUBLE = {
    "norm1.linear": ("img_mod.lin", 0, 1),
    "norm1_context.linear": ("txt_mod.lin", 0, 1),
    "attn.to_q": ("img_attn.qkv", 0, 3),
    "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.net.0.proj": ("img_mlp.0", 0, 1),
    "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1),
    "ff_context.net.2": ("txt_mlp.2", 0, 1),
}
_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
# The single blocks' linear1 holds q, k, v (hidden each) then the MLP input (mlp_dim): unequal parts.
_SINGLE = {
    "norm.linear": ("modulation.lin", None),
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped
}


def diffusers_name(name: str, cfg: FluxConfig) -> tuple[str, slice | None, bool]:
    """Where a diffusers parameter goes: (BFL name, rows of the fused tensor or None, swap halves).

    Raises KeyError for a name that is not part of FluxTransformer2DModel."""
    stem, _, kind = name.rpartition(".")
    h, m = cfg.hidden_size, cfg.mlp_dim
    if match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name):
        index, rest = match.groups()
        if rest in _DOUBLE_NORMS:
            return f"double_blocks.{index}.{_DOUBLE_NORMS[rest]}", None, False
        inner, _, kind = rest.rpartition(".")
        target, part, parts = _DOUBLE[inner]
        rows = slice(part * h, (part + 1) * h) if parts > 1 else None
        return f"double_blocks.{index}.{target}.{kind}", rows, False
    if match := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", name):
        index, rest = match.groups()
        if rest in _SINGLE_NORMS:
            return f"single_blocks.{index}.{_SINGLE_NORMS[rest]}", None, False
        inner, _, kind = rest.rpartition(".")
        target, chunk = _SINGLE[inner]
        rows = None
        if chunk is not None:
            rows = slice(chunk * h, (chunk + 1) * h) if chunk < 3 else slice(3 * h, 3 * h + m)
        return f"single_blocks.{index}.{target}.{kind}", rows, False
    return f"{_TOP[stem]}.{kind}", None, stem == "norm_out.linear"


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def load_diffusers_state(model: LeanFluxTransformer, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy diffusers-named tensors into `model` (cast to its dtype, into fused rows where they belong).
    Every parameter of the model must be written exactly once: a missing or unknown name is an error."""
    own = dict(model.named_parameters())
    rows_written: dict[str, int] = {}
    for name, tensor in tensors:
        try:
            target, rows, swap = diffusers_name(name, model.config)
        except KeyError:
            raise ValueError(f"unexpected parameter {name!r} for a FLUX.1 transformer") from None
        param = own.get(target)
        if param is None:
            raise ValueError(f"parameter {name!r} has no place in this model ({target!r})")
        if swap:
            tensor = _swap_halves(tensor)
        dest = param.data if rows is None else param.data[rows]
        if dest.shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {target} {tuple(dest.shape)}")
        dest.copy_(tensor)
        rows_written[target] = rows_written.get(target, 0) + (tensor.shape[0] if tensor.ndim else 1)
    missing = [n for n, p in own.items() if rows_written.get(n, 0) != (p.shape[0] if p.ndim else 1)]
    if missing:
        raise ValueError(f"weights are missing for {len(missing)} parameter(s), e.g. {missing[:3]}")


def from_diffusers_model(
    reference: Any, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> LeanFluxTransformer:
    """A lean copy of a live FluxTransformer2DModel (tests; or a pipeline loaded by diffusers)."""
    cfg = FluxConfig.from_diffusers(reference.config)
    first = next(reference.parameters())
    model = _empty(cfg, dtype or first.dtype, device or first.device)
    with torch.no_grad():
        load_diffusers_state(model, ((n, p.detach()) for n, p in reference.named_parameters()))
    return model.eval()


def _empty(cfg: FluxConfig, dtype: torch.dtype, device: torch.device | str) -> LeanFluxTransformer:
    """The model with uninitialised storage on `device` (no random init of 12B parameters)."""
    with torch.device("meta"):
        model = LeanFluxTransformer(cfg).to(dtype)  # cast while still shapes only: no fp32 copy on device
    return model.to_empty(device=device)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    return files


def _tensors(files: list[Path], device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors file is not iterable
                yield name, f.get_tensor(name)


def from_diffusers_dir(
    folder: Path, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> LeanFluxTransformer:
    """From a diffusers `transformer/` folder (or a pipeline folder containing one)."""
    folder = Path(folder)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    cfg = FluxConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    model = _empty(cfg, dtype, device)
    with torch.no_grad():
        load_diffusers_state(model, _tensors(_safetensors_files(folder)))
    return model.eval()


_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def config_from_bfl_shapes(shapes: Mapping[str, tuple[int, ...]]) -> FluxConfig:
    """The architecture of a BFL-layout state dict, read off its tensor shapes (QK-norm size = head
    size; RoPE axes are FLUX.1's 16/56/56, so the head size must be 128)."""
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    depth = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("double_blocks.")), default=-1)
    single = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("single_blocks.")), default=-1)
    mlp_dim = (
        shapes["double_blocks.0.img_mlp.0.weight"][0]
        if depth
        else shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
    )
    if head_dim != 128:
        raise ValueError(f"head size {head_dim} is not FLUX.1's 128: pass the config (RoPE axes) explicitly")
    return FluxConfig(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single=single,
        context_dim=shapes["txt_in.weight"][1],
        vec_dim=shapes["vector_in.in_layer.weight"][1],
        mlp_ratio=mlp_dim / hidden,
        axes_dim=(16, 56, 56),
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def from_bfl_file(
    path: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: FluxConfig | None = None,
) -> LeanFluxTransformer:
    """From Black Forest Labs' single-file checkpoint (our names are theirs)."""
    from safetensors import safe_open

    def strip(name: str) -> str:
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                return name[len(prefix) :]
        return name

    with safe_open(str(path), framework="pt", device="cpu") as f:
        shapes = {strip(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    cfg = config or config_from_bfl_shapes(shapes)
    model = _empty(cfg, dtype, device)
    own = dict(model.named_parameters())
    seen: set[str] = set()
    with torch.no_grad():
        for name, tensor in _tensors([Path(path)]):
            name = strip(name)
            if name not in own:
                raise ValueError(f"unexpected parameter {name!r} in {path}")
            if own[name].shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(own[name].shape)}")
            own[name].data.copy_(tensor)
            seen.add(name)
    if missing := sorted(set(own) - seen):
        raise ValueError(f"{path} lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
    return model.eval()


def save_bfl_file(model: LeanFluxTransformer, path: Path) -> None:
    """Write the model as a BFL single file (tests and tools: the same layout BFL publishes)."""
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}, str(path))
