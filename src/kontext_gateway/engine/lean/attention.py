"""Joint attention over [text | noise | context] tokens, on the fastest kernel the device offers.

Kontext's attention has no mask and head size 128: exactly what FlashAttention 3 (Hopper), cuDNN's
fused attention and FlashAttention 2 are built for. The choice is made once per model, not per call.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# (B, L, H, D) in, (B, Lq, H*D) out
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention, as diffusers' "native" backend calls it."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def _sdpa_on(backends: list[Any]) -> Attention:
    from torch.nn.attention import sdpa_kernel

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backends):
            return sdpa(q, k, v)

    return attention


def _flash3() -> Attention | None:
    if importlib.util.find_spec("flash_attn_interface") is None:
        return None
    import flash_attn_interface  # FlashAttention 3 (Hopper); takes (B, L, H, D)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_interface.flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        return out.flatten(2)

    return attention


BACKENDS = ("auto", "sdpa", "cudnn", "flash", "flash3")


def pick(device: torch.device | str, dtype: torch.dtype, backend: str = "auto") -> tuple[str, Attention]:
    """(name, function) of the attention to use. "auto": FlashAttention 3 when importable on a Hopper
    GPU in bf16, else cuDNN attention on CUDA (what Replicate runs FLUX with), else plain SDPA."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (one of {', '.join(BACKENDS)})")
    device = torch.device(device)
    if device.type != "cuda" or backend == "sdpa":
        return "sdpa", sdpa
    from torch.nn.attention import SDPBackend

    if backend in ("auto", "flash3") and dtype in (torch.bfloat16, torch.float16):
        major, _ = torch.cuda.get_device_capability(device)
        fa3 = _flash3() if major == 9 else None
        if fa3 is not None:
            return "flash3", fa3
        if backend == "flash3":
            log.info("FlashAttention 3 is not importable here; using cuDNN attention")
    if backend == "flash":
        return "flash", _sdpa_on([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    # cuDNN first; the others stay allowed for shapes or dtypes it does not take (fp32 on CUDA).
    return "cudnn", _sdpa_on(
        [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )
