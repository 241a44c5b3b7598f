"""The lean FLUX.1 Kontext transformer: the same weights and maths as diffusers' FluxTransformer2DModel,
in Black Forest Labs' fused layout, built for speed.

- `model.py`: the network (fused qkv, single-block `linear1`), and a per-request `Plan` that computes
  once what every step would otherwise recompute (text projection, RoPE tables, all steps' modulation).
- `weights.py`: loading diffusers-layout folders, BFL single files, or a live diffusers model.
- `attention.py`: the fastest attention kernel the device has.
- `fp8.py`, `stepcache.py`: the opt-in faster modes behind `acceleration: regular | high`.
- `adapter.py`: the switch. It answers diffusers' transformer call, so every pipeline feature (several
  context images, masks, true CFG, previews) runs on the lean model unchanged.

Everything here but this file imports torch: the engine imports it lazily.
"""

# The `acceleration` values (fal's names), known here without torch so requests can be checked early.
ACCELERATIONS: tuple[str, ...] = ("none", "regular", "high")
