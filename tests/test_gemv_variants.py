"""int8 GEMV variants (evalsuite.kernels.int8_gemv): every variant and every tile of its autotune
space equals the exact product within one rounding of the output dtype, on shapes that are not
multiples of the tiles, with and without bias. Runs on CUDA or under TRITON_INTERPRET=1; skips
without Triton."""

from __future__ import annotations

import pytest
import torch

from evalsuite.errors import EvalsuiteError

kernels = pytest.importorskip("evalsuite.kernels.int8_gemv")
if not kernels.HAVE_TRITON:
    pytest.skip("Triton is not installed", allow_module_level=True)


def kernel_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if kernels.INTERPRET:
        return torch.device("cpu")
    pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def int8_problem(n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Random codes over the full int8 range (both extremes included), positive scales, one row x."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    w[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    s = torch.rand(n, generator=gen) * 0.01 + 1e-3
    b = torch.randn(n, generator=gen) if bias else None
    x = torch.randn(k, generator=gen)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return x.to(device=device, dtype=dtype), w.to(device), to(s), to(b)


def assert_within_one_rounding(y: torch.Tensor, x, w, s, b) -> None:
    """|y - exact| <= one ulp of the output dtype (the interpreter truncates where CUDA rounds to
    nearest) plus float32 accumulation error, exact = float64 (x @ w^T) * s + b."""
    exact = (x.double() @ w.double().T) * s.double() + (0 if b is None else b.double())
    exact = exact.cpu()
    bound = torch.finfo(y.dtype).eps * exact.abs() + 1e-5 * exact.abs().max()
    diff = (y.double().cpu() - exact).abs()
    assert y.dtype == x.dtype and y.shape == exact.shape
    assert bool((diff <= bound).all()), f"worst excess {float((diff - bound).max()):.3g}"


SHAPES = [(37, 300, True), (70, 1030, False), (5, 2052, True)]


@pytest.mark.parametrize("variant", kernels.VARIANTS)
@pytest.mark.parametrize("n, k, bias", SHAPES)
def test_variant_default_path_is_exact_within_rounding(variant, n, k, bias):
    dev = kernel_device()
    x, w, s, b = int8_problem(n, k, bias, torch.bfloat16, dev)
    assert_within_one_rounding(kernels.int8_gemv(x, w, s, b, variant=variant), x, w, s, b)


@pytest.mark.parametrize("variant", kernels.VARIANTS)
def test_every_tile_of_the_autotune_space_is_exact(variant):
    # K = 1030 is no multiple of any BLOCK_K (word falls back to magic: K % 4 != 0), K = 2052 is
    # (a multiple of 4, not of the word tiles); N = 19 leaves a partial row tile for every BLOCK_N > 1
    dev = kernel_device()
    for k in (1030, 2052):
        x, w, s, b = int8_problem(19, k, True, torch.float32, dev, seed=k)
        for cfg in kernels.variant_configs(variant):
            y = kernels.int8_gemv_config(x, w, s, b, variant, cfg)
            assert_within_one_rounding(y, x, w, s, b)


@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_split_k_partial_sums_add_up(split, bias):
    dev = kernel_device()
    x, w, s, b = int8_problem(21, 1000, bias, torch.bfloat16, dev, seed=split)
    cfg = kernels._cfg(8, 64, 4)
    assert_within_one_rounding(kernels.int8_gemv_config(x, w, s, b, "splitk", cfg, split=split), x, w, s, b)


def test_word_variant_reads_each_byte_of_a_word_in_column_order():
    # one nonzero code per column position mod 4: a swapped byte order or x order moves the result
    dev = kernel_device()
    k = 64
    w = torch.zeros(4, k, dtype=torch.int8)
    for i in range(4):
        w[i, i::4] = torch.tensor([-128, 127, -1, 1] * (k // 16), dtype=torch.int8)
    x = torch.arange(1, k + 1, dtype=torch.float32)
    s = torch.ones(4)
    y = kernels.int8_gemv(x.to(dev), w.to(dev), s.to(dev), None, variant="word")
    assert_within_one_rounding(y, x, w, s, None)


def test_fast_module_uses_the_selected_variant(monkeypatch):
    from torch import nn

    from evalsuite.quantize import parse_scheme, quantize_

    dev = kernel_device()
    lin = quantize_(nn.Sequential(nn.Linear(96, 33, bias=True)), parse_scheme("int8-wo+head")).to(dev)
    x = torch.randn(1, 96, device=dev)
    ref = lin(x).double()
    calls = []
    real = kernels._gemv
    monkeypatch.setattr(kernels, "_gemv", lambda *a: calls.append(a[4]) or real(*a))
    monkeypatch.setattr(kernels, "GEMV_VARIANT", "word")
    from evalsuite.quantize.fast_int8 import fast_int8

    with fast_int8(lin):
        fast = lin(x).double()
    assert calls == ["word"]
    assert float((fast - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(EvalsuiteError, match="unknown int8 GEMV variant 'nope'"):
        kernels.check_variant("nope")
