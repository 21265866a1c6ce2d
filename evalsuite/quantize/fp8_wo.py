"""fp8-wo: weight-only float8 (e4m3fn), symmetric, one scale per output channel.

``scale = max(|w_row|) / 448`` (448 is e4m3fn's largest finite value; the row maximum is clamped
below at float32 eps), ``q = float8_e4m3fn(clamp(w / scale, ±448))`` rounded to nearest even,
runtime ``F.linear(x, q.to(x.dtype)) * scales`` as int8-wo's. e4m3 keeps 3 mantissa bits: a weight's
relative rounding error is at most 2^-4, about 29-31 dB of weight SQNR for normal values, and unlike
int8 it does not depend on how far a value sits under its row's maximum (down to 2^-6 of it, where
e4m3 turns subnormal). There is no fp8 x bf16 kernel: the forward is this expression on every device
(the cast of an e4m3 value to bf16 or fp16 is exact), so its path is always ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evalsuite.quantize.base import ChannelScaledLinear, QuantHandler, SchemeConfig
from evalsuite.quantize.policy import LayerPolicy

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Float8WeightOnlyConfig(SchemeConfig):
    scheme = "fp8-wo"


def quantize_fp8(t: torch.Tensor, dim: int | None = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3fn along ``dim`` (None: one scale for the whole tensor): (codes as
    float8_e4m3fn, float32 scales, keepdim along ``dim`` or 0-dim). Saturates at ±448 rather than
    relying on the cast's overflow behaviour, which differs between CPU (saturate) and CUDA (NaN)."""
    t = t.float()
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scales = amax.clamp(min=_EPS) / FP8_MAX
    return (t / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


class WeightOnlyFloat8Linear(ChannelScaledLinear):
    code_dtype = FP8


class WeightOnlyFloat8QuantHandler(QuantHandler):
    def __init__(self, mod: nn.Module, policy: LayerPolicy | None = None):
        super().__init__(mod, policy)

    @torch.no_grad()
    def create_quantized_state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.mod.state_dict()
        for name in self.layer_names:
            linear = self.mod.get_submodule(name)
            q, scales = quantize_fp8(linear.weight, dim=1)
            sd[f"{name}.weight"] = q
            # the weight's dtype, as int8-wo: a float32 scale would promote a bf16 output to float32
            sd[f"{name}.scales"] = scales.squeeze(1).to(linear.weight.dtype)
        return sd

    def runtime_module(self, linear: nn.Linear) -> WeightOnlyFloat8Linear:
        return WeightOnlyFloat8Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            dtype=linear.weight.dtype, device=linear.weight.device,
        )
