"""FP8 linears (`acceleration: regular | high`): e4m3 weights with one scale per output row, activations
quantised per token on the fly, one `torch._scaled_mm` per linear (fp32 accumulation).

Only the token-parallel block linears (qkv, proj, MLP, linear1, linear2: >99.9 % of the FLOPs) switch;
embedders, modulation and the final layer stay in the model's dtype, as flux-fast and Replicate do.
The bf16 weights are kept, so a request can ask for `none` and get the exact model: the fp8 copy adds
half the block linears' memory (8.6 B weights in the 12B model: about 8.6 GB), made on the first
request that asks for it. Row-wise scales keep an outlier row from
flattening the others, which per-tensor scaling would do.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def supported(device: torch.device | str, *, cpu: bool = False) -> bool:
    """Whether fp8 linears make sense here: CUDA compute capability 8.9+ (Ada, Hopper, Blackwell).
    PyTorch's CPU kernel runs them too, ~1.5x slower than fp32 (benchmarks/RESULTS.md section 11), so
    the CPU counts only when asked (`cpu=True`: tests of the numerics)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return cpu and device.type == "cpu"


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 tensor, fp32 scale per row (rows, 1)) with t ~= fp8 * scale."""
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Fp8Linear(nn.Module):
    """Wraps an nn.Linear: the same parameters (names unchanged), plus an fp8 copy used while `active`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        w8, w_scale = quantize_rows(linear.weight)
        self.register_buffer("weight_fp8", w8, persistent=False)
        self.register_buffer("weight_scale", w_scale.t().contiguous(), persistent=False)  # (1, out)
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        x8, x_scale = quantize_rows(rows)
        fused_bias = self.bias is not None and x.dtype == torch.bfloat16
        y = torch._scaled_mm(
            x8,
            self.weight_fp8.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            bias=self.bias if fused_bias else None,
            out_dtype=x.dtype,
        )
        if self.bias is not None and not fused_bias:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def block_linear_names(model: nn.Module) -> Iterator[str]:
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        if name.endswith((".lin",)):  # modulation: per request, not per token
            continue
        yield name


def attach(model: nn.Module) -> int:
    """Give every block linear of `model` its fp8 copy (inactive). Returns how many."""
    names = list(block_linear_names(model))
    with torch.no_grad():
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, Fp8Linear(getattr(parent, attr)))
    return len(names)


def attached(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def set_active(model: nn.Module, active: bool) -> None:
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.active = active
