"""The switch: the lean transformer behind diffusers' FluxTransformer2DModel call.

diffusers' Kontext pipelines (and our subclasses for several context images and masks) call
`transformer(hidden_states=..., encoder_hidden_states=..., pooled_projections=..., timestep=...,
img_ids=..., txt_ids=..., guidance=...)` once per step (twice with true CFG). This module answers that
call with the lean model, so every pipeline feature keeps working, and adds what a per-step call cannot
do on its own:

- Inside `request(scheduler, ...)`, the first call for a given text (positive or negative prompt)
  builds a `Plan` for *all* the scheduler's steps at once; later calls look the step up from the
  scheduler's own step counter (a Python int: no device read-back).
- The acceleration mode of the request: fp8 linears on or off, and the step cache.

Outside `request(...)` each call is planned on its own (correct, just without the precomputation).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from . import ACCELERATIONS, fp8
from .model import LeanFluxTransformer, Plan
from .stepcache import TaylorCache

log = logging.getLogger(__name__)

Acceleration = Literal["none", "regular", "high"]


@dataclass
class RequestStats:
    """What the request's transformer calls did (the engine reports it)."""

    acceleration: str = "none"
    applied: list[str] = field(default_factory=list)  # "fp8", "step_cache"
    calls: int = 0  # forward calls received (steps x passes)
    computed: int = 0  # of which ran the transformer


class _Config(dict[str, Any]):
    """diffusers reads `transformer.config.in_channels` and `config.guidance_embeds`."""

    __getattr__ = dict.__getitem__


class LeanTransformer(nn.Module):
    def __init__(self, model: LeanFluxTransformer) -> None:
        super().__init__()
        self.model = model
        self.config = _Config(model.config.to_diffusers())
        self._scheduler: Any = None
        self._cache_steps = False
        self._plans: dict[tuple[int, ...], tuple[Plan, tuple[Any, ...]]] = {}
        self.stats = RequestStats()
        self._noise_counts: dict[int, tuple[torch.Tensor, int]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    # The CPU runs fp8 correctly but slower than fp32: only tests of the numerics turn this on.
    fp8_on_cpu = False

    def fp8_available(self) -> bool:
        return fp8.supported(self.device, cpu=self.fp8_on_cpu)

    @contextmanager
    def request(self, scheduler: Any, acceleration: Acceleration = "none") -> Iterator[RequestStats]:
        """One image request: plans live until it ends. `acceleration`: "regular" = fp8 linears (where
        the device runs them), "high" = fp8 and the step cache. What was applied is in the yielded stats."""
        if acceleration not in ACCELERATIONS:
            raise ValueError(f"acceleration must be one of {', '.join(ACCELERATIONS)}")
        use_fp8 = acceleration in ("regular", "high") and self.fp8_available()
        if use_fp8 and not fp8.attached(self.model):
            log.info("quantising the transformer's block linears to fp8 (once; kept for later requests)")
            fp8.attach(self.model)
        self.stats = RequestStats(acceleration=acceleration)
        self.stats.applied = (["fp8"] if use_fp8 else []) + (["step_cache"] if acceleration == "high" else [])
        self._scheduler, self._cache_steps = scheduler, acceleration == "high"
        fp8.set_active(self.model, use_fp8)
        try:
            yield self.stats
            if "step_cache" in self.stats.applied and self.stats.computed == self.stats.calls:
                self.stats.applied.remove("step_cache")  # too few steps to skip any (computed_steps)
        finally:
            fp8.set_active(self.model, False)
            self._scheduler, self._cache_steps = None, False
            self._plans.clear()

    def _model_timesteps(self, t: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
        """Timesteps as the model sees them, rounded as diffusers' loop rounds them: the pipeline casts
        t to the latents' dtype and divides by 1000, the model casts and multiplies by 1000."""
        return ((t.to(input_dtype) / 1000).to(self.dtype)) * 1000

    def _plan(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None,
        noise_tokens: int,
    ) -> tuple[Plan, int]:
        def build(timesteps: torch.Tensor) -> Plan:
            g = guidance.to(self.dtype) * 1000 if guidance is not None else None
            return self.model.plan(
                txt=encoder_hidden_states,
                pooled=pooled,
                timesteps=timesteps,
                guidance=g,
                txt_ids=txt_ids,
                img_ids=img_ids,
                noise_tokens=noise_tokens,
            )

        if self._scheduler is None:  # a lone call: plan this one step
            return build(timestep[:1].to(self.dtype) * 1000), 0
        inputs = (encoder_hidden_states, pooled, img_ids, txt_ids, guidance)
        key = (*(id(t) for t in inputs), *hidden_states.shape, noise_tokens)
        found = self._plans.get(key)
        if found is None:  # the first call of this request for this text: every step's plan at once
            plan = build(self._model_timesteps(self._scheduler.timesteps.to(hidden_states.device), hidden_states.dtype))
            if self._cache_steps:
                plan.extra["cache"] = TaylorCache(plan.steps)
            found = self._plans[key] = (plan, inputs)  # the inputs are kept: their ids stay theirs
        return found[0], self._scheduler.step_index or 0

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        noise_tokens: int | None = None,
        **unused: Any,
    ) -> Any:
        """diffusers' signature. The output holds only the noise tokens' velocity: diffusers slices
        `[:, :latents.size(1)]` from it, which is then all of it. `noise_tokens` defaults to the tokens
        whose RoPE axis 0 is 0 (context tokens have 1 and up), read from the ids once per plan."""
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if noise_tokens is None:
            noise_tokens = self._noise_tokens(img_ids)
        plan, step = self._plan(
            hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance, noise_tokens
        )
        self.stats.calls += 1
        cache: TaylorCache | None = plan.extra.get("cache")
        if cache is not None and not cache.needs(step):
            out = cache.predict(step)
        else:
            out = self.model(hidden_states, plan, step)
            self.stats.computed += 1
            if cache is not None:
                cache.record(step, out)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    def _noise_tokens(self, img_ids: torch.Tensor) -> int:
        """Noise tokens come first and have axis-0 id 0. Counted once per ids tensor (a read-back, so
        not per step: the pipeline passes the same ids tensor every step)."""
        cached = self._noise_counts.get(id(img_ids))
        if cached is not None and cached[0] is img_ids:
            return cached[1]
        count = int((img_ids[:, 0] == 0).sum().item())
        self._noise_counts = {id(img_ids): (img_ids, count)}
        return count
