"""int8-dq: dynamic per-token int8 activations times per-channel int8 weights (W8A8).

Weights: symmetric per output channel, ``scale_w = absmax_row / 127``, codes in [-127, 127].
Activations: quantized at run time per token the same way, ``scale_x = absmax_token / 127``.
Output ``(q_x @ q_w^T) * scale_x * scale_w + bias``. This is the numerics reference: the integer
product is accumulated in float32 (exact while partial sums stay under 2^24), not by an int8 GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.quantize.base import QuantHandler, QuantizedLinear, SchemeConfig
from evalsuite.quantize.policy import LayerPolicy

_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Int8DynamicActivationInt8WeightConfig(SchemeConfig):
    scheme = "int8-dq"


def quantize_symmetric_int8(t: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along ``dim``: (codes in [-127, 127] as int8, float32 scales with keepdim)."""
    t = t.float()
    scales = t.abs().amax(dim=dim, keepdim=True).clamp(min=_EPS) / 127
    return torch.round(t / scales).clamp(-127, 127).to(torch.int8), scales


class Int8DynActInt8WeightLinear(QuantizedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx, sx = quantize_symmetric_int8(x)
        y = F.linear(qx.float(), self.weight.float()) * sx * self.scales
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.unsqueeze(-1)


class Int8DynActInt8WeightQuantHandler(QuantHandler):
    def __init__(self, mod: nn.Module, policy: LayerPolicy | None = None):
        super().__init__(mod, policy)

    @torch.no_grad()
    def create_quantized_state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.mod.state_dict()
        for name in self.layer_names:
            linear = self.mod.get_submodule(name)
            q, scales = quantize_symmetric_int8(linear.weight, dim=1)
            sd[f"{name}.weight"] = q
            sd[f"{name}.scales"] = scales.squeeze(1)
        return sd

    def runtime_module(self, linear: nn.Linear) -> Int8DynActInt8WeightLinear:
        return Int8DynActInt8WeightLinear(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            dtype=linear.weight.dtype, device=linear.weight.device,
        )
