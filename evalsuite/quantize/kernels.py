"""Faster forward paths for quantized runtime modules: opt-in, device-guarded, checked against the
reference forward. The handlers' numerics and their reference forwards are unchanged.

int8 weight-only GEMV (Triton), for one row of activations (batch-1 decoding): each program owns
BLOCK_N output channels and streams their int8 rows exactly once, accumulating ``x * q`` in float32,
then applies the per-channel scale (and bias) and rounds once to the activation dtype:
``y = round((x @ q^T) * scales + bias)``. The reference ``F.linear(x, q.to(x.dtype)) * scales``
rounds the product before scaling, so the two agree within the dtype's rounding, not bit for bit.
Anything else (several rows, CPU tensors, no Triton) takes the reference path.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from evalsuite.quantize.int8_wo import WeightOnlyInt8Linear

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs have no Triton
    HAVE_TRITON = False


# read once: Triton decides at import whether kernels are interpreted, and a constant keeps the
# guard below free of environment lookups inside torch.compile'd code
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


if HAVE_TRITON:

    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_wn,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0)
            x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)

    _int8_gemv_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                 for bn, bk, w in ((4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8))],
        key=["N", "K"],
    )(_int8_gemv_kernel)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(x @ weight^T) * scales + bias`` for x of shape [K] (or [1, K]); weight int8 [N, K] row-major."""
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed")
    n, k = weight.shape
    x = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    args = (x, weight, scales, bias if bias is not None else scales, y, n, k, weight.stride(0))
    if INTERPRET:  # the interpreter cannot benchmark configs: one fixed tile
        _int8_gemv_kernel[grid](*args, HAS_BIAS=bias is not None, BLOCK_N=8, BLOCK_K=64)
    else:
        _int8_gemv_tuned[grid](*args, HAS_BIAS=bias is not None)
    return y


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fast path's guard: one activation row, a row-major int8 weight, on a CUDA device
    (or any device under the Triton interpreter, for testing)."""
    return (HAVE_TRITON and (x.is_cuda or INTERPRET) and x.numel() == x.shape[-1]
            and weight.is_contiguous() and weight.dtype == torch.int8)


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
