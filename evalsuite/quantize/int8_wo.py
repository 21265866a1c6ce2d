"""int8-wo: the seed scheme, gpt-fast's WeightOnlyInt8QuantHandler.

Weight-only int8, symmetric, one scale per output channel:
``scale = max(|min_row|, |max_row|) / 127.5`` (clamped below at float32 eps),
``q = clamp(round(w / scale), -128, 127)``, runtime ``F.linear(x, q.to(x.dtype)) * scales``.
Three hazards of the seed are fixed: biases are kept, scales take the weight's dtype (the seed's
bfloat16 buffer turns fp16 outputs into fp32), and the layers quantized follow a LayerPolicy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evalsuite.quantize.base import ChannelScaledLinear, QuantHandler, SchemeConfig
from evalsuite.quantize.policy import LayerPolicy


@dataclass(frozen=True)
class Int8WeightOnlyConfig(SchemeConfig):
    scheme = "int8-wo"


def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Returns (int8 weight, float32 scales [out], count of values clamped to the int8 range).

    Computed in float32 as the seed does; the caller casts the scales to the weight's dtype.
    """
    w = w.float()
    min_val, max_val = torch.aminmax(w, dim=1)
    absmax = torch.maximum(-torch.clamp(min_val, max=0), torch.clamp(max_val, min=0))
    scales = torch.clamp(absmax / 127.5, min=torch.finfo(torch.float32).eps)
    q = torch.round(w / scales.unsqueeze(-1))
    clipped = int(((q < -128) | (q > 127)).sum())
    return q.clamp(-128, 127).to(torch.int8), scales, clipped


class WeightOnlyInt8Linear(ChannelScaledLinear):
    code_dtype = torch.int8


class WeightOnlyInt8QuantHandler(QuantHandler):
    def __init__(self, mod: nn.Module, policy: LayerPolicy | None = None):
        super().__init__(mod, policy)

    @torch.no_grad()
    def create_quantized_state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.mod.state_dict()
        for name in self.layer_names:
            linear = self.mod.get_submodule(name)
            q, scales, _ = quantize_per_channel_int8(linear.weight)
            sd[f"{name}.weight"] = q
            sd[f"{name}.scales"] = scales.to(linear.weight.dtype)
        return sd

    def runtime_module(self, linear: nn.Linear) -> WeightOnlyInt8Linear:
        return WeightOnlyInt8Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            dtype=linear.weight.dtype, device=linear.weight.device,
        )
