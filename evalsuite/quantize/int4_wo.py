"""int4-wo-g{32,64,128,256}: groupwise asymmetric int4 weights, as gpt-fast's int4 handler.

Per group of ``group_size`` input columns: ``scale = max(max - min, 1e-6) / 15``,
``zero = min + 8 * scale``, ``q = clamp(round((w - min) / scale), 0, 15)``,
dequantized ``(q - 8) * scale + zero``. gpt-fast then packs for a CUDA-only kernel; here two codes
share a byte and the runtime dequantizes and calls ``F.linear``, which runs on CPU and GPU alike.
An input width that the group size does not divide is zero-padded to a multiple of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.quantize.base import QuantHandler, QuantizedLinear, SchemeConfig
from evalsuite.quantize.policy import LayerPolicy

GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class Int4WeightOnlyConfig(SchemeConfig):
    group_size: int = 128

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def scheme(self) -> str:
        return f"int4-wo-g{self.group_size}"


def padded_width(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def quantize_groupwise_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (uint8 codes 0..15 [out, padded_in], float32 scales and zeros [out, n_groups])."""
    w = w.float()
    out_features, in_features = w.shape
    width = padded_width(in_features, group_size)
    if width != in_features:
        w = F.pad(w, (0, width - in_features))
    groups = w.reshape(-1, group_size)
    max_val = groups.amax(dim=1, keepdim=True)
    min_val = groups.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-6) / 15
    zeros = min_val + scales * 8
    q = groups.sub(min_val).div(scales).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(out_features, width), scales.reshape(out_features, -1), zeros.reshape(out_features, -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


class WeightOnlyInt4Linear(QuantizedLinear):
    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        width = padded_width(in_features, group_size)
        n_groups = width // group_size
        self.register_buffer("weight", torch.empty(out_features, width // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        q = unpack_int4(self.weight).to(dtype).unflatten(1, (-1, self.group_size))
        w = (q - 8) * self.scales.to(dtype).unsqueeze(-1) + self.zeros.to(dtype).unsqueeze(-1)
        return w.flatten(1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight(x.dtype), self.bias)

    def dequantize(self) -> torch.Tensor:
        return self._weight(torch.float32)


class WeightOnlyInt4QuantHandler(QuantHandler):
    def __init__(self, mod: nn.Module, group_size: int = 128, policy: LayerPolicy | None = None):
        super().__init__(mod, policy)
        self.group_size = group_size

    @torch.no_grad()
    def create_quantized_state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.mod.state_dict()
        for name in self.layer_names:
            linear = self.mod.get_submodule(name)
            q, scales, zeros = quantize_groupwise_int4(linear.weight, self.group_size)
            sd[f"{name}.weight"] = pack_int4(q)
            sd[f"{name}.scales"] = scales.to(linear.weight.dtype)
            sd[f"{name}.zeros"] = zeros.to(linear.weight.dtype)
        return sd

    def runtime_module(self, linear: nn.Linear) -> WeightOnlyInt4Linear:
        return WeightOnlyInt4Linear(
            linear.in_features, linear.out_features, self.group_size, bias=linear.bias is not None,
            dtype=linear.weight.dtype, device=linear.weight.device,
        )
