"""int8 weight-only GEMV (Triton), for one row of activations (batch-1 decoding): each program owns
BLOCK_N output channels and streams their int8 rows exactly once, accumulating ``x * q`` in float32,
then applies the per-channel scale (and bias) and rounds once to the activation dtype:
``y = round((x @ q^T) * scales + bias)``. The reference ``F.linear(x, q.to(x.dtype)) * scales``
rounds the product before scaling, so the two agree within the dtype's rounding, not bit for bit.
Anything else (several rows, CPU tensors, no Triton) takes the reference path.

Variants of the GEMV (same result within that rounding), chosen by ``GEMV_VARIANT`` (environment
``EVALSUITE_GEMV_VARIANT``, default ``magic``, the fastest on an H100: 79% of copy bandwidth over one
llama-2-7b decode step's GEMVs against base's 74.5%, benchmarks/RESULTS.md) or the ``variant``
argument of ``int8_gemv``:

- ``base``: the first kernel and its six autotune configurations, kept as the reference point.
- ``wide``: the same arithmetic over a wider autotune space (1 to 16 rows per program, K tiles up
  to 4096, 1 to 8 warps; num_stages 1 to 3 changes nothing in Triton 3.9's code for sm_90, whose
  pipeliner stages only loads that feed tl.dot).
- ``magic``: as ``wide`` (plus tiles that load the next K tile before computing on the current
  one), but each int8 code becomes float32 without a conversion instruction:
  ``bits(q + 0x4B000080)`` is the float ``2**23 + 128 + q`` exactly, so subtracting ``2**23 + 128``
  gives ``q`` (8388736.0 below). Hopper converts 16 values per clock per SM against 64 integer and
  128 float32 operations, so the conversions (one per weight byte) limit the other kernels once
  the weights stream at HBM speed.
- ``word``: the weight read as int32 words (four codes each, 16-byte loads of four words per
  thread), the bytes taken out with shifts and the same float trick; needs K divisible by 4
  (otherwise ``magic`` runs).
- ``splitk``: ``magic`` with the K range split over a second grid axis when few output rows would
  leave SMs idle: each program writes its scaled float32 partial sums to a [split, N] buffer and a
  second small kernel adds them (and the bias) and rounds once, so the result is the same sum in a
  different order. Costs one more kernel launch per call.
"""

from __future__ import annotations

import os

import torch

from evalsuite.errors import EvalsuiteError
from evalsuite.kernels import HAVE_TRITON, INTERPRET

if HAVE_TRITON:
    import triton
    import triton.language as tl


VARIANTS = ("base", "wide", "magic", "word", "splitk")
# read once, like INTERPRET; set the module attribute (or pass ``variant=``) to switch at run time
GEMV_VARIANT = os.environ.get("EVALSUITE_GEMV_VARIANT", "magic")

# the split-K ranges are multiples of this, so every K tile of a split lies inside it
SPLIT_ALIGN = 1024


def _cfg(bn: int, bk: int, warps: int, stages: int = 1, prefetch: bool = False) -> dict:
    cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
    return {**cfg, "PREFETCH": True} if prefetch else cfg


# the first kernel's tiles (num_stages 3 is triton.Config's default, which they used)
BASE_CONFIGS = [_cfg(bn, bk, w, 3) for bn, bk, w in
                ((4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8))]
# Tiles for the batch-1 GEMV on Hopper: each thread holds 16 to 64 bytes of weights per K step
# (one to four 16-byte loads in flight per row), from one row per program (many small programs)
# to sixteen (x read once for more rows).
WIDE_CONFIGS = [
    _cfg(1, 2048, 4), _cfg(1, 4096, 4), _cfg(1, 1024, 1, 3), _cfg(2, 2048, 4), _cfg(2, 4096, 8),
    _cfg(2, 1024, 2, 3), _cfg(4, 1024, 4), _cfg(4, 2048, 4), _cfg(4, 512, 1, 3), _cfg(4, 1024, 2, 2),
    _cfg(8, 512, 4, 2), _cfg(8, 1024, 8), _cfg(16, 512, 8),
]
# magic adds register double buffering to the tiles of at most 32 bytes a thread (more would
# cost occupancy)
MAGIC_CONFIGS = WIDE_CONFIGS + [
    {**c, "PREFETCH": True} for c in WIDE_CONFIGS if c["BLOCK_N"] * c["BLOCK_K"] <= 32 * 32 * c["num_warps"]]
# word: BLOCK_K counts int32 words (four codes each)
WORD_CONFIGS = [
    _cfg(1, 512, 4), _cfg(1, 1024, 4), _cfg(1, 256, 1, 3), _cfg(2, 512, 4), _cfg(2, 1024, 8),
    _cfg(2, 256, 2, 3), _cfg(4, 256, 4), _cfg(4, 512, 4), _cfg(4, 128, 1, 3), _cfg(8, 128, 4, 2),
    _cfg(8, 256, 8), _cfg(16, 128, 8),
]
# split-K: more rows per program (the split restores the program count); BLOCK_K <= SPLIT_ALIGN
SPLITK_CONFIGS = [
    _cfg(4, 1024, 4), _cfg(8, 512, 4), _cfg(8, 1024, 8), _cfg(16, 256, 4), _cfg(16, 512, 8),
    _cfg(32, 256, 8), _cfg(8, 256, 2, 2), _cfg(16, 128, 2, 3), _cfg(8, 512, 4, prefetch=True),
    _cfg(16, 512, 8, prefetch=True), _cfg(16, 256, 4, prefetch=True),
]
# one small tile under the interpreter, which cannot benchmark configurations
INTERPRET_CONFIG = {"base": _cfg(8, 64, 4), "wide": _cfg(4, 64, 4), "magic": _cfg(4, 64, 4, prefetch=True),
                    "word": _cfg(4, 16, 4), "splitk": _cfg(4, 64, 4, prefetch=True)}


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
        configs=[triton.Config({"BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]}, num_warps=c["num_warps"],
                               num_stages=c["num_stages"]) for c in BASE_CONFIGS],
        key=["N", "K"],
    )(_int8_gemv_kernel)

    @triton.jit
    def _codes_to_float(w, MAGIC: tl.constexpr):
        """int8 codes to float32: a conversion instruction, or the exact bit trick (module doc)."""
        if MAGIC:
            bits = w.to(tl.int32) + 0x4B000080
            return bits.to(tl.float32, bitcast=True) - 8388736.0
        else:
            return w.to(tl.float32)

    @triton.jit
    def _byte_to_float(u, SHIFT: tl.constexpr):
        """Byte SHIFT/8 of words whose bytes hold ``q + 128`` (sign bits flipped), as float32 ``q``."""
        bits = ((u >> SHIFT) & 0xFF) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _gemv_rows_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_wn, k_split,
                          HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr, PARTIAL: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
        """BLOCK_N rows per program over K range [pid_k * k_split, +k_split) (k_split a multiple of
        BLOCK_K when PARTIAL); PARTIAL stores the scaled float32 sums at y[pid_k, n] for the reduction.
        PREFETCH issues the loads of the next K tile before computing on the current one (register
        double buffering: Triton's pipeliner does not stage loads that feed no tl.dot)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n[:, None] * stride_wn
        k_start = pid_k * k_split
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if PREFETCH:
            offs_k = k_start + tl.arange(0, BLOCK_K)
            w_next = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :], other=0)
            x_next = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
            for k0 in range(0, k_split, BLOCK_K):
                w, x = w_next, x_next
                offs_k = k_start + k0 + BLOCK_K + tl.arange(0, BLOCK_K)
                k_mask = (offs_k < K) & (offs_k < k_start + k_split)
                w_next = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
                x_next = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
                acc += _codes_to_float(w, MAGIC) * x.to(tl.float32)[None, :]
        else:
            for k0 in range(0, k_split, BLOCK_K):
                offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
                x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                acc += _codes_to_float(w, MAGIC) * x[None, :]
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if PARTIAL:
            tl.store(y_ptr + pid_k * N + offs_n, y, mask=n_mask)
        else:
            if HAS_BIAS:
                y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _gemv_word_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K4, stride_wn,
                          HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The weight as int32 words [N, K4]; byte i of word j holds the code of column 4j + i."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_rows = w_ptr + offs_n[:, None] * stride_wn
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for j0 in range(0, K4, BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            j_mask = offs_j < K4
            # xor 0x80 into every byte: the bytes then hold q + 128 in [0, 255]
            u = tl.load(w_rows + offs_j[None, :], mask=n_mask[:, None] & j_mask[None, :], other=0) ^ -2139062144
            xs = tl.load(x_ptr + offs_j[:, None] * 4 + tl.arange(0, 4)[None, :], mask=j_mask[:, None], other=0.0)
            x_even, x_odd = tl.split(tl.reshape(xs.to(tl.float32), (BLOCK_K, 2, 2)))  # x[4j + 2a], x[4j + 2a + 1]
            x0, x2 = tl.split(x_even)
            x1, x3 = tl.split(x_odd)
            acc += (_byte_to_float(u, 0) * x0[None, :] + _byte_to_float(u, 8) * x1[None, :]
                    + _byte_to_float(u, 16) * x2[None, :] + _byte_to_float(u, 24) * x3[None, :])
        y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK: tl.constexpr):
        """y[n] = round(sum_s p[s, n] + bias[n]) for the split-K partial sums p [SPLIT, N]."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT):
            acc += tl.load(p_ptr + s * N + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    def _configs(cfgs: list[dict], rows: bool = True) -> list:
        """Autotune configurations; the rows kernel gets PREFETCH in every one, since torch.compile's
        launcher of a user kernel takes no default for a constexpr parameter."""
        extra = {"PREFETCH": False} if rows else {}
        return [triton.Config({**extra, **{k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}},
                              num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in cfgs]

    # one autotuner per variant: each keeps its own best configuration per shape
    _TUNED = {
        "wide": triton.autotune(configs=_configs(WIDE_CONFIGS), key=["N", "K"])(_gemv_rows_kernel),
        "magic": triton.autotune(configs=_configs(MAGIC_CONFIGS), key=["N", "K"])(_gemv_rows_kernel),
        "splitk": triton.autotune(configs=_configs(SPLITK_CONFIGS), key=["N", "K", "k_split"])(_gemv_rows_kernel),
        "word": triton.autotune(configs=_configs(WORD_CONFIGS, rows=False), key=["N", "K4"])(_gemv_word_kernel),
    }


def variant_configs(variant: str) -> list[dict]:
    """The tiles a variant's autotuner chooses from (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    check_variant(variant)
    return {"base": BASE_CONFIGS, "wide": WIDE_CONFIGS, "magic": MAGIC_CONFIGS, "word": WORD_CONFIGS,
            "splitk": SPLITK_CONFIGS}[variant]


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise EvalsuiteError(f"unknown int8 GEMV variant {variant!r}; known: {', '.join(VARIANTS)}")
    return variant


def default_split(n: int, k: int) -> int:
    """Splits of K for ``splitk``: enough that about 16384 / N output tiles become ~4 per SM on a
    132-SM card for the usual 16-row tiles, never a range shorter than SPLIT_ALIGN."""
    return max(1, min(k // SPLIT_ALIGN, -(-16384 // n)))


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              variant: str | None = None) -> torch.Tensor:
    """``(x @ weight^T) * scales + bias`` for x of shape [K] (or [1, K]); weight int8 [N, K] row-major.
    ``variant`` defaults to ``GEMV_VARIANT``; the autotuner picks the tile per (N, K)."""
    return _gemv(x, weight, scales, bias, variant or GEMV_VARIANT, None, None)


def int8_gemv_config(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                     variant: str, config: dict, split: int | None = None) -> torch.Tensor:
    """``int8_gemv`` with one fixed tile (a ``variant_configs`` entry) instead of autotuning, and for
    ``splitk`` an explicit number of K splits: for benchmarks and tests."""
    return _gemv(x, weight, scales, bias, variant, config, split)


def _gemv(x, weight, scales, bias, variant, config, split) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed")
    check_variant(variant)
    n, k = weight.shape
    x = x.reshape(k).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    if config is None and INTERPRET:  # the interpreter cannot benchmark configs: one fixed tile
        config = INTERPRET_CONFIG[variant]
    # storage_offset, not data_ptr: this runs under torch.compile's fake tensors too
    if variant == "word" and (k % 4 or weight.storage_offset() % 4):
        variant = "magic"
        config = None if config is None else INTERPRET_CONFIG["magic"]
    if variant == "base":
        _launch_base(x, weight, scales, bias, y, config)
    elif variant == "word":
        _launch_word(x, weight, scales, bias, y, config)
    else:
        _launch_rows(x, weight, scales, bias, y, variant, config, split)
    return y


def _fixed(config: dict) -> dict:
    """Launch keywords of one tile (PREFETCH only where set: base and word have no such parameter;
    the rows kernel's launches add PREFETCH=False where it is not)."""
    return {"num_stages": 1, **config}


def _launch_base(x, weight, scales, bias, y, config) -> None:
    n, k = weight.shape
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    args = (x, weight, scales, bias if bias is not None else scales, y, n, k, weight.stride(0))
    if config is not None:
        _int8_gemv_kernel[grid](*args, HAS_BIAS=bias is not None, **_fixed(config))
    else:
        _int8_gemv_tuned[grid](*args, HAS_BIAS=bias is not None)


def _launch_word(x, weight, scales, bias, y, config) -> None:
    n, k = weight.shape
    words = weight.view(torch.int32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    args = (x, words, scales, bias if bias is not None else scales, y, n, k // 4, words.stride(0))
    if config is not None:
        _gemv_word_kernel[grid](*args, HAS_BIAS=bias is not None, **_fixed(config))
    else:
        _TUNED["word"][grid](*args, HAS_BIAS=bias is not None)


def _launch_rows(x, weight, scales, bias, y, variant, config, split) -> None:
    n, k = weight.shape
    has_bias = bias is not None
    b = bias if has_bias else scales
    splits = 1
    if variant == "splitk":
        splits = split or default_split(n, k)
    if splits > 1:
        align = config["BLOCK_K"] if config is not None else SPLIT_ALIGN
        k_split = -(-(-(-k // splits)) // align) * align
        splits = -(-k // k_split)
    else:
        k_split = k
    out = torch.empty(splits, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    args = (x, weight, scales, b, out, n, k, weight.stride(0), k_split)
    flags = dict(HAS_BIAS=has_bias, MAGIC=variant != "wide", PARTIAL=splits > 1)
    if config is not None:
        _gemv_rows_kernel[grid](*args, **flags, **{"PREFETCH": False, **_fixed(config)})
    else:
        _TUNED[variant][grid](*args, **flags)
    if splits > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(n, block),)](out, b, y, n, SPLIT=splits, HAS_BIAS=has_bias, BLOCK=block)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fast path's guard: one activation row, a row-major int8 weight, on a CUDA device
    (or any device under the Triton interpreter, for testing)."""
    return (HAVE_TRITON and (x.is_cuda or INTERPRET) and x.numel() == x.shape[-1]
            and weight.is_contiguous() and weight.dtype == torch.int8)
