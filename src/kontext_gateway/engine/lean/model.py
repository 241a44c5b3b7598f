"""The FLUX.1 Kontext transformer in Black Forest Labs' fused layout.

Same maths, same dtype path as diffusers' FluxTransformer2DModel (the reference: tests compare the two
block by block on the same random weights), with these changes, all exact:

- Fused projections: one `qkv` GEMM per stream in the double blocks; one `linear1` GEMM per single
  block giving q, k, v and the MLP input together, one `linear2` taking attention and MLP outputs.
- Per-request precomputation (`Plan`): the text projection, RoPE cos/sin for all tokens, and the
  modulation vectors of every block for *every step* in one GEMM per block, instead of ~350 small
  GEMMs and as many launches per step. A step then only runs the big token-parallel work.
- The single stream is concatenated once, not split and re-joined in every block.
- The last single block and the final layer compute only the rows that are kept (noise tokens):
  text and context rows are thrown away after the last attention anyway.
- No host synchronisation inside a step: nothing reads a tensor's value back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, sdpa


@dataclass(frozen=True)
class FluxConfig:
    """The architecture. Defaults are FLUX.1 Kontext [dev] (12B)."""

    in_channels: int = 64
    out_channels: int = 64
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single: int = 38
    context_dim: int = 4096  # T5 features
    vec_dim: int = 768  # CLIP pooled features
    mlp_ratio: float = 4.0
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> FluxConfig:
        """From a FluxTransformer2DModel config (config.json of a diffusers `transformer/` folder)."""
        if config.get("patch_size", 1) != 1:
            raise ValueError("only patch_size 1 (FLUX.1's packed 2x2 latents) is supported")
        in_channels = config.get("in_channels", 64)
        heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
        return cls(
            in_channels=in_channels,
            out_channels=config.get("out_channels") or in_channels,
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=config.get("num_layers", 19),
            depth_single=config.get("num_single_layers", 38),
            context_dim=config.get("joint_attention_dim", 4096),
            vec_dim=config.get("pooled_projection_dim", 768),
            axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(config.get("guidance_embeds", False)),
        )

    def to_diffusers(self) -> dict[str, Any]:
        return dict(
            patch_size=1,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_layers=self.depth,
            num_single_layers=self.depth_single,
            attention_head_dim=self.head_dim,
            num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_dim,
            pooled_projection_dim=self.vec_dim,
            guidance_embeds=self.guidance_embed,
            axes_dims_rope=tuple(self.axes_dim),
        )

    def flops_per_step(self, tokens: int, batch: int = 1) -> float:
        """FLOP of one forward over `tokens` (text + noise + context): the token-parallel linears
        (2 x multiply-adds) plus attention (4 L^2 hidden per block). Embedders and modulation add < 0.1 %;
        the rows the last block skips (~0.8 %) are not subtracted, so this is the reference's count."""
        h, m = self.hidden_size, self.mlp_dim
        blocks = self.depth + self.depth_single
        linear = 2 * tokens * blocks * (4 * h * h + 2 * h * m)  # same per token in both kinds of block
        attention = 4 * tokens * tokens * h * blocks
        return float(batch * (linear + attention))


# --------------------------------------------------------------------------------------------------
# Small pieces, each written as diffusers computes it (dtype casts included).


def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal features (cos | sin) in fp32: diffusers' Timesteps(256, flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim) in fp32 for position ids (L, axes): frequencies in float64 as diffusers'
    FluxPosEmbed (float32 where the device has no float64), each value repeated for its pair."""
    freqs_dtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64
    pos = ids.float()
    cos_out, sin_out = [], []
    for i, dim in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=freqs_dtype, device=ids.device) / dim))
        angles = torch.outer(pos[:, i].to(freqs_dtype), freqs)
        cos_out.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_out.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x0, x1) of (B, L, H, D) by the tables (L, D), in fp32, back to x's dtype."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos[None, :, None, :] + rotated.float() * sin[None, :, None, :]).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSScale(head_dim)
        self.key_norm = RMSScale(head_dim)


class RMSScale(nn.Module):
    """RMSNorm over the head dimension (eps 1e-6); BFL names its weight `scale`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale, eps=1e-6)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    def __init__(self, hidden: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(hidden, chunks * hidden)

    def forward(self, silu_vec: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., chunks, hidden), from the already SiLU-ed conditioning vector."""
        return self.lin(silu_vec).unflatten(-1, (self.chunks, -1))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class MLP(nn.Sequential):
    def __init__(self, hidden: int, mlp_dim: int) -> None:
        super().__init__(nn.Linear(hidden, mlp_dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_dim, hidden))


# --------------------------------------------------------------------------------------------------
# Blocks


class DoubleBlock(nn.Module):
    """Text and image streams with their own weights, joined in one attention."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.img_mod = Modulation(h, 6)
        self.img_attn = SelfAttention(h, cfg.num_heads)
        self.img_mlp = MLP(h, cfg.mlp_dim)
        self.txt_mod = Modulation(h, 6)
        self.txt_attn = SelfAttention(h, cfg.num_heads)
        self.txt_mlp = MLP(h, cfg.mlp_dim)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        img_mod: torch.Tensor,
        txt_mod: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention: Attention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img_mod / txt_mod: (B, 6, hidden) for this step."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod.unbind(1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod.unbind(1)
        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1))
        q = apply_rope(torch.cat([tq, iq], dim=1), *rope)
        k = apply_rope(torch.cat([tk, ik], dim=1), *rope)
        out = attention(q, k, torch.cat([tv, iv], dim=1)).to(q.dtype)
        t_out, i_out = out.split([txt.shape[1], img.shape[1]], dim=1)

        img = img + i_gate1[:, None] * self.img_attn.proj(i_out)
        img = img + i_gate2[:, None] * self.img_mlp(modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1[:, None] * self.txt_attn.proj(t_out)
        txt = txt + t_gate2[:, None] * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleBlock(nn.Module):
    """One stream, attention and MLP side by side: `linear1` makes q, k, v and the MLP input at once,
    `linear2` maps attention output and MLP activation back together."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads, self.hidden, self.mlp_dim = cfg.num_heads, h, cfg.mlp_dim
        self.modulation = Modulation(h, 3)
        self.linear1 = nn.Linear(h, 3 * h + cfg.mlp_dim)
        self.linear2 = nn.Linear(h + cfg.mlp_dim, h)
        self.norm = QKNorm(cfg.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention: Attention,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """mod: (B, 3, hidden). `rows`: compute only these output rows (all keys still attend)."""
        shift, scale, gate = mod.unbind(1)
        qkv, mlp = self.linear1(modulate(x, shift, scale)).split([3 * self.hidden, self.mlp_dim], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
        q = apply_rope(self.norm.query_norm(q), *rope)
        k = apply_rope(self.norm.key_norm(k), *rope)
        if rows is not None:
            q, mlp, x = q[:, rows], mlp[:, rows], x[:, rows]
        out = attention(q, k, v).to(q.dtype)
        out = self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=-1))
        return x + gate[:, None] * out


class FinalLayer(nn.Module):
    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))
        self.linear = nn.Linear(cfg.hidden_size, cfg.out_channels)


# --------------------------------------------------------------------------------------------------
# Per-request precomputation


@dataclass
class Plan:
    """What stays the same for every step of one request, computed once.

    `img_mods[i]`/`txt_mods[i]`: (steps, B, 6, hidden) for double block i; `single_mods[j]`:
    (steps, B, 3, hidden); `final_mods`: (steps, B, 2, hidden) as (shift, scale)."""

    txt: torch.Tensor  # (B, Lt, hidden): the text features after txt_in
    rope: tuple[torch.Tensor, torch.Tensor]  # (Lt + Limg, head_dim) each, fp32
    img_mods: list[torch.Tensor]
    txt_mods: list[torch.Tensor]
    single_mods: list[torch.Tensor]
    final_mods: torch.Tensor
    noise_tokens: int
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)  # the adapter's bookkeeping (step cache...)

    @property
    def batch(self) -> int:
        return self.txt.shape[0]


class LeanFluxTransformer(nn.Module):
    """FLUX.1 (Kontext) flow transformer with BFL parameter names (`img_in`, `double_blocks.{i}.img_attn.qkv`,
    `single_blocks.{j}.linear1`, `final_layer.adaLN_modulation.1`...), so a BFL single file loads as is."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise ValueError(f"RoPE axes {cfg.axes_dim} must add up to the head size {cfg.head_dim}")
        self.config = cfg
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h)
        self.txt_in = nn.Linear(cfg.context_dim, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.vec_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if cfg.guidance_embed else nn.Identity()
        self.double_blocks = nn.ModuleList(DoubleBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = FinalLayer(cfg)
        self.attention: Attention = sdpa
        self.attention_name = "sdpa"

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def use_attention(self, backend: str = "auto", device: torch.device | str | None = None) -> str:
        """Pick the attention kernel for `device` (default: where the weights are now)."""
        from .attention import pick

        self.attention_name, self.attention = pick(device or self.device, self.dtype, backend)
        return self.attention_name

    def compile_blocks(self, mode: str | None = None) -> None:
        """torch.compile each block (regional compilation: the 57 blocks share two compiled graphs, so
        it compiles in minutes, not tens of minutes). Inductor fuses the norms, modulation, RoPE and
        gated residuals around the GEMMs. Shapes are static per request size: a new size compiles once.
        `mode`: default "max-autotune-no-cudagraphs" on CUDA, Inductor's default elsewhere."""
        if mode is None and self.device.type == "cuda":
            mode = "max-autotune-no-cudagraphs"
        for block in [*self.double_blocks, *self.single_blocks]:
            block.compile(mode=mode, dynamic=False)

    def conditioning(
        self, timesteps: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor
    ) -> torch.Tensor:
        """The conditioning vector (steps, B, hidden) for every step at once. `timesteps`: (steps,) and
        `guidance`: (B,) already in the model's units (x1000), in the model's dtype."""
        dtype = pooled.dtype
        vec = self.time_in(timestep_features(timesteps).to(dtype))[:, None]  # (steps, 1, h)
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled: a guidance value is required")
            vec = vec + self.guidance_in(timestep_features(guidance).to(dtype))[None]
        return vec + self.vector_in(pooled)[None]

    def plan(
        self,
        *,
        txt: torch.Tensor,
        pooled: torch.Tensor,
        timesteps: torch.Tensor,
        guidance: torch.Tensor | None,
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
        noise_tokens: int,
    ) -> Plan:
        """Everything per request: `txt` (B, Lt, context_dim) T5 features, `pooled` (B, vec_dim),
        `timesteps` (steps,) and `guidance` (B,) in model units, ids (Lt, 3) and (Limg, 3), and how many
        of the image tokens are noise (they come first; context tokens follow)."""
        silu_vec = F.silu(self.conditioning(timesteps, guidance, pooled))
        final = self.final_layer.adaLN_modulation[1](silu_vec.to(self.dtype)).unflatten(-1, (2, -1))
        return Plan(
            txt=self.txt_in(txt),
            rope=rope_tables(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dim, self.config.theta),
            img_mods=[b.img_mod(silu_vec) for b in self.double_blocks],
            txt_mods=[b.txt_mod(silu_vec) for b in self.double_blocks],
            single_mods=[b.modulation(silu_vec) for b in self.single_blocks],
            final_mods=final,
            noise_tokens=noise_tokens,
            steps=timesteps.shape[0],
        )

    def forward(self, tokens: torch.Tensor, plan: Plan, step: int) -> torch.Tensor:
        """The velocity (B, noise tokens, out_channels) at `step` for packed latents `tokens`
        (B, noise + context tokens, in_channels)."""
        img = self.img_in(tokens)
        txt = plan.txt
        lt = txt.shape[1]
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, plan.img_mods[i][step], plan.txt_mods[i][step], plan.rope, self.attention)
        keep = slice(lt, lt + plan.noise_tokens)
        if self.single_blocks:
            x = torch.cat([txt, img], dim=1)
            last = len(self.single_blocks) - 1
            for j, block in enumerate(self.single_blocks):
                x = block(x, plan.single_mods[j][step], plan.rope, self.attention, rows=keep if j == last else None)
        else:
            x = img[:, : plan.noise_tokens]
        shift, scale = plan.final_mods[step].unbind(1)
        return self.final_layer.linear(modulate(x, shift, scale))
