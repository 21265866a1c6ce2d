"""Fused elementwise kernels for Llama-family forwards (Triton): RMSNorm, rotary embedding and SwiGLU's
``silu(gate) * up``, each reading its inputs once and rounding once to the output dtype. The
definitions and their agreement with the eager modules are described in
:mod:`evalsuite.load.fast_forward`, which swaps them into a model. Forward only: no autograd.
"""

from __future__ import annotations

import torch

from evalsuite.kernels import HAVE_TRITON, INTERPRET

if HAVE_TRITON:
    import triton
    import triton.language as tl

# widest row the one-pass RMSNorm keeps in registers; wider rows take the eager forward
MAX_NORM_WIDTH = 8192
SILU_BLOCK = 2048


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["n_rows"])
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y, eps,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        # round to the input dtype before the weight, as LlamaRMSNorm does
        normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :],
                 (normed * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_heads(x_ptr, y_ptr, b, pos, n_heads, sxb, sxh, sxl, sxd, syb, syh, syl, syd,
                      c1, c2, s1, s2, d, dmask, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        h = tl.arange(0, BLOCK_H)
        mask = (h[:, None] < n_heads) & dmask[None, :]
        src = x_ptr + b * sxb + pos * sxl + h[:, None] * sxh + d[None, :] * sxd
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
        dst = y_ptr + b * syb + pos * syl + h[:, None] * syh + d[None, :] * syd
        tl.store(dst, (x1 * c1[None, :] - x2 * s1[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF * syd, (x2 * c2[None, :] + x1 * s2[None, :]).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["seq_len"])
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, n_q, n_k, seq_len,
                       sqb, sqh, sql, sqd, skb, skh, skl, skd,
                       sob, soh, sol, sod, spb, sph, spl, spd,
                       scb, scl, scd, ssb, ssl, ssd,
                       HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
                       BLOCK_HK: tl.constexpr):
        # one program per token (b, pos): its cos/sin row is read once for all q and k heads
        tok = tl.program_id(0).to(tl.int64)
        b = tok // seq_len
        pos = tok % seq_len
        d = tl.arange(0, BLOCK_D)
        dmask = d < HALF
        c = cos_ptr + b * scb + pos * scl + d * scd
        s = sin_ptr + b * ssb + pos * ssl + d * ssd
        c1 = tl.load(c, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(c + HALF * scd, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(s, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(s + HALF * ssd, mask=dmask, other=0.0).to(tl.float32)
        _rotate_heads(q_ptr, qo_ptr, b, pos, n_q, sqb, sqh, sql, sqd, sob, soh, sol, sod,
                      c1, c2, s1, s2, d, dmask, HALF, BLOCK_HQ)
        _rotate_heads(k_ptr, ko_ptr, b, pos, n_k, skb, skh, skl, skd, spb, sph, spl, spd,
                      c1, c2, s1, s2, d, dmask, HALF, BLOCK_HK)

    @triton.jit(do_not_specialize=["n_rows"])
    def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n_rows, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        # the bound is rows x a constant width: Triton then knows it is a multiple of 16 (for the
        # usual widths) and loads 16 bytes at a time, with rows free to change without a recompile
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_rows * WIDTH
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # torch's silu: x / (1 + exp(-x)) in the accumulation type
        tl.store(y_ptr + offs, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=mask)


def kernels_apply(t: torch.Tensor) -> bool:
    """The fused paths' guard: Triton present and a CUDA tensor (any tensor under the interpreter)."""
    return HAVE_TRITON and (t.is_cuda or INTERPRET)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm in one kernel: ``weight * (x_f32 * rsqrt(mean(x_f32**2, -1) + eps)).to(x.dtype)``,
    returned in ``promote_types(weight.dtype, x.dtype)``. Rows may be strided (last dim contiguous)."""
    n = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return y
    block = _pow2(n)
    per_program = max(1, min(16, 4096 // block, _pow2(rows)))
    warps = 4 if block * per_program <= 4096 else 8
    _rms_norm_kernel[(triton.cdiv(rows, per_program),)](
        x2, weight, y, rows, n, x2.stride(0), n, float(eps), ROWS=per_program, BLOCK=block, num_warps=warps)
    return y


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``apply_rotary_pos_emb(q, k, cos, sin)`` (unsqueeze_dim 1) in one kernel for q and k.

    q: [B, H, L, D], k: [B, Hkv, L, D] (any strides); cos, sin: [B or 1, L, D]. The outputs keep the
    layout of q and k and have the dtype of ``q * cos`` (their promoted dtype)."""
    bsz, n_q, seq_len, dim = q.shape
    n_k = k.shape[1]
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    qo = torch.empty_like(q, dtype=out_dtype)
    ko = torch.empty_like(k, dtype=out_dtype)
    if q.numel() == 0 or k.numel() == 0:
        return qo, ko
    cos = cos.expand(bsz, seq_len, dim)
    sin = sin.expand(bsz, seq_len, dim)
    half = dim // 2
    _rotary_kernel[(bsz * seq_len,)](
        q, k, cos, sin, qo, ko, n_q, n_k, seq_len, *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
        *cos.stride(), *sin.stride(), HALF=half, BLOCK_D=_pow2(half), BLOCK_HQ=_pow2(n_q), BLOCK_HK=_pow2(n_k),
        num_warps=2 if _pow2(n_q) * _pow2(half) <= 1024 else 4)
    return qo, ko


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one kernel (silu in float32, one rounding), dtype promoted as eager's."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = y.numel()
    if n:
        width = y.shape[-1]
        _silu_mul_kernel[(triton.cdiv(n, SILU_BLOCK),)](gate, up, y, n // width, WIDTH=width, BLOCK=SILU_BLOCK,
                                                        num_warps=8)
    return y
