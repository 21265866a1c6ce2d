"""Faster forward paths for quantized runtime modules: opt-in, device-guarded, checked against the
reference forward. The handlers' numerics and their reference forwards are unchanged; the kernel
itself is :mod:`evalsuite.kernels.int8_gemv`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from evalsuite.kernels import HAVE_TRITON  # noqa: F401  (the speed stage asks here)
from evalsuite.kernels.int8_gemv import gemv_applies, int8_gemv
from evalsuite.quantize.int8_wo import WeightOnlyInt8Linear


class FastWeightOnlyInt8Linear(WeightOnlyInt8Linear):
    """WeightOnlyInt8Linear whose batch-1 forward is the Triton GEMV; same tensors, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not gemv_applies(x, self.weight):
            return super().forward(x)
        y = int8_gemv(x, self.weight, self.scales, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def fast_int8(model: nn.Module):
    """Within the block every ``WeightOnlyInt8Linear`` of ``model`` runs the fast forward; yields how
    many modules were switched. The classes are restored on exit (modules may be shared)."""
    switched = [m for m in model.modules() if type(m) is WeightOnlyInt8Linear]
    for m in switched:
        m.__class__ = FastWeightOnlyInt8Linear
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.__class__ = WeightOnlyInt8Linear


def check_fast_int8(model: nn.Module, dtype: torch.dtype, seed: int = 0) -> float:
    """Largest |fast - reference| / max|reference| over the model's fast int8 modules for one random
    row; the speed stage refuses to time a fast path whose error exceeds the dtype's rounding."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    worst = 0.0
    for m in model.modules():
        if isinstance(m, FastWeightOnlyInt8Linear):
            x = torch.randn(1, m.in_features, generator=gen).to(device=m.weight.device, dtype=dtype)
            ref = WeightOnlyInt8Linear.forward(m, x).float()
            worst = max(worst, float((m(x).float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)))
    return worst
