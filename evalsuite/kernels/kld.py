"""One-pass per-token statistics of the ppl stage (Triton): the same values as
:func:`evalsuite.measure.perplexity.paired_token_stats` and :func:`~evalsuite.measure.perplexity.token_nll`,
reading each row of logits once instead of materialising two float32 log-softmax matrices.

One program per token row streams both rows (reference P, candidate Q) in blocks of LANES x CHUNK
logits, in float32, with an online softmax kept per lane (a lane is CHUNK adjacent logits of each
block, held by one thread, so nothing crosses threads inside the loop): per side a running maximum m
(the shift c is m, or 0 while m is -inf), s = sum exp(z - c), rescaled by exp(c_old - c_new) when the
maximum grows, and the first index of the maximum; the lanes are combined once at the end. With
k = zp[target] - zq[target] (any constant is exact; this one keeps the sum small; 0 where not finite)
and t = sum exp(zp - c_p) (zp - zq - k):

    KL(P||Q) = sum_x P(x) (ln P(x) - ln Q(x)) = t / s_p + k - (c_p - c_q) - ln(s_p / s_q)

clamped at 0, NLL = (c - z[target]) + ln s per side, delta_p = exp(-NLL_q) - exp(-NLL_p), same_top1 =
(first index of the maximum of zp == that of zq, like ``torch.argmax``), and, on request, whether each
row is all finite (max < inf, min > -inf, no NaN). NaN/inf propagate through the float arithmetic as in the
torch version, and the same masks apply: every paired value is NaN where either row is not finite or
the KL or either NLL is not finite; ``own_nll_ref`` / ``own_nll`` are NaN only where that NLL is not.
The float32 sums run in another order than torch's, so values agree to float32 rounding, not bit for
bit. Rows are independent of each other: calling on a batch of windows at once gives each row the
same bits as calling per window.
"""

from __future__ import annotations

import torch

from evalsuite.kernels import HAVE_TRITON, INTERPRET

if HAVE_TRITON:
    import triton
    import triton.language as tl
    import triton.testing

# interpreter (tests): one small fixed block of 64 logits, so small vocabularies still take whole
# blocks and a tail
INTERPRET_CONFIG = {"LANES": 8, "CHUNK": 8}
OUTPUT_KEYS = ("kld", "delta_p", "same_top1", "nll_ref", "nll", "own_nll_ref", "own_nll", "finite_ref", "finite")
PAIRED_KEYS = OUTPUT_KEYS[:7]


if HAVE_TRITON:

    @triton.jit
    def _side(z, m, s, arg, lo, start, mask, MASKED: tl.constexpr, ARGMAX: tl.constexpr, FLAGS: tl.constexpr):
        """One side's per-lane state after one block ``z`` [LANES, CHUNK] (float32; masked -inf): running
        maximum, sum of exp(z - c), first index of the maximum, minimum; also the rescale factor and
        exp(z - c). A lane's CHUNK logits sit in one thread, so the reductions over axis 1 are local."""
        if ARGMAX:
            bm, j = tl.max(z, 1, return_indices=True, return_indices_tie_break_left=True)
            arg = tl.where(bm > m, start + j, arg)  # strictly greater: the first maximum stays
        else:
            bm = tl.max(z, 1)
        m_new = tl.maximum(m, bm)
        c = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - c)  # 0 while m is -inf (and s is 0)
        e = tl.exp(z - c[:, None])
        s = s * alpha + tl.sum(e, 1)
        if FLAGS:
            if MASKED:
                lo = tl.minimum(lo, tl.min(tl.where(mask, z, float("inf")), 1))
            else:
                lo = tl.minimum(lo, tl.min(z, 1))
        return m_new, s, arg, lo, alpha, e

    @triton.jit
    def _block(p_row, q_row, v0, V, k, m_p, s_p, i_p, lo_p, m_q, s_q, i_q, lo_q, t,
               LANES: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr, HAS_Q: tl.constexpr,
               FLAGS: tl.constexpr):
        start = v0 + tl.arange(0, LANES) * CHUNK
        offs = start[:, None] + tl.arange(0, CHUNK)[None, :]
        mask = offs < V
        if MASKED:
            zp = tl.load(p_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        else:
            zp = tl.load(p_row + offs).to(tl.float32)
        m_p, s_p, i_p, lo_p, alpha_p, e_p = _side(zp, m_p, s_p, i_p, lo_p, start, mask, MASKED, HAS_Q, FLAGS)
        if HAS_Q:
            if MASKED:
                zq = tl.load(q_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            else:
                zq = tl.load(q_row + offs).to(tl.float32)
            m_q, s_q, i_q, lo_q, alpha_q, e_q = _side(zq, m_q, s_q, i_q, lo_q, start, mask, MASKED, HAS_Q, FLAGS)
            term = e_p * ((zp - zq) - k)
            if MASKED:  # masked lanes hold 0 * (-inf - -inf)
                term = tl.where(mask, term, 0.0)
            t = t * alpha_p + tl.sum(term, 1)
        return m_p, s_p, i_p, lo_p, m_q, s_q, i_q, lo_q, t

    @triton.jit
    def _combine(m, s, arg, lo, V, ARGMAX: tl.constexpr):
        """A row's shift c, sum of exp(z - c), first index of its maximum, whether it is all finite, and
        each lane's weight exp(m_lane - c)."""
        mx = tl.max(m, 0)
        c = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp(m - c)
        total = tl.sum(s * w, 0)
        if ARGMAX:
            arg = tl.min(tl.where(m == mx, arg, V), 0)
        finite = (mx < float("inf")) & (tl.min(lo, 0) > float("-inf")) & (total == total)
        return c, total, arg, finite, w

    @triton.jit(do_not_specialize=["N", "M"])  # batch sizes vary; compile once
    def _row_stats_kernel(p_ptr, q_ptr, tgt_ptr, out_ptr, N, M, V,
                          sp_b, sp_m, sq_b, sq_m, st_b, st_m,
                          HAS_Q: tl.constexpr, FLAGS: tl.constexpr, LANES: tl.constexpr, CHUNK: tl.constexpr):
        BLOCK_V: tl.constexpr = LANES * CHUNK
        row = tl.program_id(0).to(tl.int64)
        b, j = row // M, row % M
        p_row = p_ptr + b * sp_b + j * sp_m
        q_row = q_ptr + b * sq_b + j * sq_m
        target = tl.load(tgt_ptr + b * st_b + j * st_m)
        t_ok = (target >= 0) & (target < V)
        zp_t = tl.load(p_row + target, mask=t_ok, other=float("nan")).to(tl.float32)
        if HAS_Q:
            zq_t = tl.load(q_row + target, mask=t_ok, other=float("nan")).to(tl.float32)
            k = zp_t - zq_t
            k = tl.where(tl.abs(k) < float("inf"), k, 0.0)
        else:
            k = 0.0

        zeros = tl.zeros((LANES,), dtype=tl.float32)
        m_p, s_p, t, lo_p = zeros + float("-inf"), zeros, zeros, zeros + float("inf")
        m_q, s_q, lo_q = m_p, s_p, lo_p
        i_p = tl.zeros((LANES,), dtype=tl.int32)
        i_q = i_p
        n_full = (V // BLOCK_V) * BLOCK_V
        for v0 in range(0, n_full, BLOCK_V):
            m_p, s_p, i_p, lo_p, m_q, s_q, i_q, lo_q, t = _block(
                p_row, q_row, v0, V, k, m_p, s_p, i_p, lo_p, m_q, s_q, i_q, lo_q, t,
                LANES, CHUNK, False, HAS_Q, FLAGS)
        if n_full < V:  # the tail, masked
            m_p, s_p, i_p, lo_p, m_q, s_q, i_q, lo_q, t = _block(
                p_row, q_row, n_full, V, k, m_p, s_p, i_p, lo_p, m_q, s_q, i_q, lo_q, t,
                LANES, CHUNK, True, HAS_Q, FLAGS)

        c_p, sum_p, i_p, fin_p, w_p = _combine(m_p, s_p, i_p, lo_p, V, HAS_Q)
        log_sp = tl.log(sum_p)
        nll_p = (c_p - zp_t) + log_sp
        ok_p = tl.abs(nll_p) < float("inf")
        nan = float("nan")
        if HAS_Q:
            c_q, sum_q, i_q, fin_q, w_q = _combine(m_q, s_q, i_q, lo_q, V, HAS_Q)
            nll_q = (c_q - zq_t) + tl.log(sum_q)
            # ln(s_p / s_q): near 0 for close rows, so no float32 ulp of ln s_p (up to ln V) enters the KL
            kld = tl.sum(t * w_p, 0) / sum_p + (k - (c_p - c_q)) - tl.log(sum_p / sum_q)
            kld = tl.where(kld < 0.0, 0.0, kld)  # NaN stays NaN
            ok_q = tl.abs(nll_q) < float("inf")
            # a NaN/inf anywhere in either row makes an NLL or the KL non-finite: the flags add nothing
            both = ok_p & ok_q & (tl.abs(kld) < float("inf"))
            delta_p = tl.exp(-nll_q) - tl.exp(-nll_p)
            same = tl.where(i_p == i_q, 1.0, 0.0)
            tl.store(out_ptr + row, tl.where(both, kld, nan))
            tl.store(out_ptr + N + row, tl.where(both, delta_p, nan))
            tl.store(out_ptr + 2 * N + row, tl.where(both, same, nan))
            tl.store(out_ptr + 3 * N + row, tl.where(both, nll_p, nan))
            tl.store(out_ptr + 4 * N + row, tl.where(both, nll_q, nan))
            tl.store(out_ptr + 5 * N + row, tl.where(ok_p, nll_p, nan))
            tl.store(out_ptr + 6 * N + row, tl.where(ok_q, nll_q, nan))
            if FLAGS:
                tl.store(out_ptr + 7 * N + row, tl.where(fin_p, 1.0, 0.0))
                tl.store(out_ptr + 8 * N + row, tl.where(fin_q, 1.0, 0.0))
        else:
            tl.store(out_ptr + row, tl.where(ok_p, nll_p, nan))
            if FLAGS:
                tl.store(out_ptr + N + row, tl.where(fin_p, 1.0, 0.0))

    # memory-bound: enough bytes in flight per SM matters more than the block's width; CHUNK 8 is one
    # 16-byte load of bf16 per lane. Few configs and short timings: each is compiled on first use
    # (once per vocabulary size in a process)
    _row_stats_tuned = triton.autotune(
        configs=[triton.Config({"LANES": lanes, "CHUNK": chunk}, num_warps=w)
                 for lanes, chunk, w in ((128, 8, 4), (256, 8, 8), (512, 8, 16), (256, 16, 8))],
        key=["V", "HAS_Q", "FLAGS"],
        do_bench=lambda kernel_call, quantiles: triton.testing.do_bench(kernel_call, warmup=5, rep=20,
                                                                        quantiles=quantiles),
    )(_row_stats_kernel)


def fused_applies(tensor: torch.Tensor) -> bool:
    """The fused path's guard: Triton is importable and the tensor is on a CUDA device (or any device
    under the Triton interpreter, for tests)."""
    return HAVE_TRITON and (tensor.is_cuda or INTERPRET)


def available_on(device: torch.device) -> bool:
    """Whether a run on ``device`` should use the fused statistics (CUDA with Triton; never the
    interpreter on a CPU run, which would be far slower than torch)."""
    return HAVE_TRITON and torch.device(device).type == "cuda"


def _rows3d(x: torch.Tensor) -> torch.Tensor:
    """[N, V] or [B, M, V] logits as a [B, M, V] view with a contiguous last dimension."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"logits must be [N, V] or [B, M, V], got {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(ref_logits: torch.Tensor, logits: torch.Tensor | None, targets: torch.Tensor,
            flags: bool = False) -> torch.Tensor:
    if not fused_applies(ref_logits):
        raise RuntimeError("fused token statistics need Triton and a CUDA tensor")
    p = _rows3d(ref_logits)
    q = _rows3d(logits) if logits is not None else p
    if q.shape != p.shape:
        raise ValueError(f"reference {tuple(p.shape)} and candidate {tuple(q.shape)} logits differ in shape")
    bsz, m, v = p.shape
    tg = targets.reshape(bsz, m) if targets.dim() != 2 else targets
    n = bsz * m
    rows = (len(OUTPUT_KEYS) if flags else len(PAIRED_KEYS)) if logits is not None else 1 + flags
    out = torch.empty((rows, n), dtype=torch.float32, device=p.device)
    if n == 0:
        return out
    args = (p, q, tg, out, n, m, v, p.stride(0), p.stride(1), q.stride(0), q.stride(1), tg.stride(0), tg.stride(1))
    if INTERPRET:  # the interpreter cannot benchmark configs: one fixed block
        _row_stats_kernel[(n,)](*args, HAS_Q=logits is not None, FLAGS=flags, **INTERPRET_CONFIG)
    else:
        _row_stats_tuned[(n,)](*args, HAS_Q=logits is not None, FLAGS=flags)
    return out


def fused_row_stats(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """All per-row outputs of the kernel (``OUTPUT_KEYS``, float32 [N]): the paired values plus
    ``finite_ref`` / ``finite`` (1.0 where every logit of that row is finite)."""
    out = _launch(ref_logits, logits, targets, flags=True)
    return dict(zip(OUTPUT_KEYS, out.unbind(0)))


def fused_paired_token_stats(ref_logits: torch.Tensor, logits: torch.Tensor,
                             targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`evalsuite.measure.perplexity.paired_token_stats` in one pass over both rows: same keys,
    same NaN rules, float32 values equal to float32 rounding. Also takes [B, M, V] views (e.g. the
    scored rows of a batch of windows) with targets [B, M]; then the vectors are flat, length B*M."""
    out = _launch(ref_logits, logits, targets)
    return dict(zip(PAIRED_KEYS, out.unbind(0)))


def fused_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`evalsuite.measure.perplexity.token_nll` in one pass: ln sum exp(z) - z[target] per row,
    float32, NaN where it is not finite."""
    return _launch(logits, None, targets)[0]


# measure_pass may hand these a whole batch of windows at once (rows are computed independently)
fused_paired_token_stats.row_independent = True
fused_token_nll.row_independent = True
