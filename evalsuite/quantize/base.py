"""What every scheme shares: the runtime-module base class and the handler contract."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.quantize.policy import LayerPolicy


@dataclass(frozen=True, kw_only=True)
class SchemeConfig:
    """What every built-in scheme's config holds (keyword-only, so a scheme's own fields keep their
    positions): whether the head is quantized too, and the NAME of ``--quant NAME=SPEC``. A subclass
    says its scheme's name, as ``--quant`` spells it, in ``scheme``."""

    include_head: bool = False
    label: str | None = None

    scheme = ""  # a class attribute or a property of the subclass, not a field

    @property
    def name(self) -> str:
        return self.label or self.scheme + ("+head" if self.include_head else "")


class QuantizedLinear(nn.Module):
    """Base of every runtime module; ``dequantize`` gives the weight the forward effectively uses."""

    in_features: int
    out_features: int

    def dequantize(self) -> torch.Tensor:
        """The effective weight, [out_features, in_features], in float32."""
        raise NotImplementedError


class ChannelScaledLinear(QuantizedLinear):
    """Weight-only codes of ``code_dtype`` with one scale per output channel, in the weight dtype:
    the seed's runtime forward, ``F.linear(x, w.to(x.dtype)) * scales``. int8-wo and fp8-wo differ only
    in the codes' dtype."""

    code_dtype: torch.dtype

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=self.code_dtype, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float().unsqueeze(-1)


class QuantHandler:
    """gpt-fast's handler contract: two methods, applied in this order.

    ``sd = h.create_quantized_state_dict()`` computes the quantized tensors from the float weights;
    ``h.convert_for_runtime()`` swaps the selected ``nn.Linear`` modules for runtime modules, after
    which ``model.load_state_dict(sd, assign=True)`` makes the model ready to run.
    """

    def __init__(self, mod: nn.Module, policy: LayerPolicy | None = None):
        self.mod = mod
        self.policy = policy or LayerPolicy()
        self.layer_names = self.policy.select(mod)

    def create_quantized_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def convert_for_runtime(self) -> nn.Module:
        for name in self.layer_names:
            parent_name, _, child = name.rpartition(".")
            parent = self.mod.get_submodule(parent_name) if parent_name else self.mod
            linear = getattr(parent, child)
            setattr(parent, child, self.runtime_module(linear))
        return self.mod

    def runtime_module(self, linear: nn.Linear) -> QuantizedLinear:
        raise NotImplementedError
