"""gpt-fast's int8 weight-only handler, as a user would keep it in their own repository.

Run it through evalsuite (this imports and runs this file):

    evalsuite run --quant examples/int8_handler.py:WeightOnlyInt8QuantHandler
    evalsuite run --quant mine=examples/int8_handler.py:quantize_int8      # the function form

It depends on torch only. The numerics are gpt-fast's ``dynamically_quantize_per_channel``
(symmetric, one scale per output row, computed in float32, scales stored in the weight's dtype),
the runtime forward is gpt-fast's ``F.linear(x, w.to(x.dtype)) * scales``. Two additions, both
optional for a handler: a ``filter_fn`` keyword (torchao's convention), through which evalsuite
passes its layer policy (output head kept in float, ``--skip-layers``), and ``dequantize()`` on the
runtime module, which the layers stage uses for weight SQNR. Unlike the seed, a bias is kept.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FilterFn = Callable[[nn.Module, str], bool]


def dynamically_quantize_per_channel(x: torch.Tensor, quant_min: int, quant_max: int, target_dtype: torch.dtype):
    eps = torch.finfo(torch.float32).eps
    min_val, max_val = torch.aminmax(x, dim=1)
    min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
    max_val_pos = torch.max(-min_val_neg, max_val_pos)
    scales = max_val_pos / (float(quant_max - quant_min) / 2)
    scales = torch.clamp(scales, min=eps).to(x.dtype)
    x_round = torch.round(x / scales.unsqueeze(-1))
    return torch.clamp(x_round, quant_min, quant_max).to(target_dtype), scales


class WeightOnlyInt8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = F.linear(input, self.weight.to(dtype=input.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float().unsqueeze(-1)


def _all_linears(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


class WeightOnlyInt8QuantHandler:
    def __init__(self, mod: nn.Module, filter_fn: FilterFn | None = None):
        self.mod = mod
        self.filter_fn = filter_fn or _all_linears  # the seed quantizes every nn.Linear

    def _selected(self) -> list[tuple[str, nn.Linear]]:
        return [(fqn, m) for fqn, m in self.mod.named_modules() if isinstance(m, nn.Linear) and self.filter_fn(m, fqn)]

    @torch.no_grad()
    def create_quantized_state_dict(self) -> dict[str, torch.Tensor]:
        cur_state_dict = self.mod.state_dict()
        for fqn, mod in self._selected():
            int8_weight, scales = dynamically_quantize_per_channel(mod.weight.float(), -128, 127, torch.int8)
            cur_state_dict[f"{fqn}.weight"] = int8_weight
            cur_state_dict[f"{fqn}.scales"] = scales.to(mod.weight.dtype)
        return cur_state_dict

    def convert_for_runtime(self) -> nn.Module:
        for fqn, child in self._selected():
            parent_name, _, name = fqn.rpartition(".")
            parent = self.mod.get_submodule(parent_name) if parent_name else self.mod
            setattr(parent, name, WeightOnlyInt8Linear(child.in_features, child.out_features, child.bias is not None,
                                                       device=child.weight.device, dtype=child.weight.dtype))
        return self.mod


def quantize_int8(model: nn.Module, filter_fn: FilterFn | None = None) -> nn.Module:
    """The same scheme in torchao's ``quantize_(model)`` shape: state dict, convert, load."""
    handler = WeightOnlyInt8QuantHandler(model, filter_fn)
    state_dict = handler.create_quantized_state_dict()
    handler.convert_for_runtime()
    model.load_state_dict(state_dict, assign=True)
    return model
