"""Stage ppl, fused statistics: the one-pass Triton kernel gives paired_token_stats' values and NaN
rules. CPU runs need Triton's interpreter (``TRITON_INTERPRET=1`` and Triton on the path); without
Triton only the import and the fallback are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax
from scipy.special import rel_entr

from evalsuite.kernels import kld as K
from evalsuite.measure import perplexity as P
from tests.conftest import make_tiny_llama

# numpy under Triton's interpreter warns on the NaN/inf rows these tests build on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
RUNNABLE = K.HAVE_TRITON and (K.INTERPRET or torch.cuda.is_available())
needs_kernel = pytest.mark.skipif(not RUNNABLE, reason="needs Triton on a CUDA device or TRITON_INTERPRET=1")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not K.INTERPRET else "cpu")
PAIRED = ("kld", "delta_p", "same_top1", "nll_ref", "nll")
# float32 sums in another order than torch's: NLL ~ a few nats to 1 ulp of ln(sum), KL to a few
# ulp of the ln-sums it is the difference of
TOL = {"kld": dict(rtol=1e-4, atol=5e-6), "delta_p": dict(rtol=1e-4, atol=1e-6), "same_top1": dict(rtol=0, atol=0),
       "nll_ref": dict(rtol=1e-5, atol=5e-6), "nll": dict(rtol=1e-5, atol=5e-6),
       "own_nll_ref": dict(rtol=1e-5, atol=5e-6), "own_nll": dict(rtol=1e-5, atol=5e-6)}


def float64_paired(ref: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """The paired statistics in float64 numpy from the same (rounded) logits; finite rows only."""
    a, b, t = ref.double().cpu().numpy(), cand.double().cpu().numpy(), targets.cpu().numpy()
    lp, lq = np_log_softmax(a, -1), np_log_softmax(b, -1)
    rows = np.arange(len(t))
    return {"kld": rel_entr(np.exp(lp), np.exp(lq)).sum(-1), "delta_p": np.exp(lq[rows, t]) - np.exp(lp[rows, t]),
            "same_top1": (a.argmax(-1) == b.argmax(-1)).astype(float), "nll_ref": -lp[rows, t], "nll": -lq[rows, t]}


def assert_same_stats(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == torch.float32 and g.shape == w.shape, k
        where = [torch.isnan(x).nonzero().flatten().tolist() for x in (g, w)]
        assert where[0] == where[1], f"{k}: NaN at {where[0]}, torch NaN at {where[1]}"
        ok = ~torch.isnan(w)
        np.testing.assert_allclose(g[ok].cpu().numpy(), w[ok].cpu().numpy(), err_msg=k, **TOL[k])


def random_pair(n: int, v: int, dtype: torch.dtype, seed: int, scale: float = 3.0, noise: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, v, generator=g) * scale
    cand = ref + noise * torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    return ref.to(DEVICE, dtype), cand.to(DEVICE, dtype), targets.to(DEVICE)


def test_import_without_triton_falls_back_to_torch():
    assert K.fused_applies(torch.zeros(1)) == (K.HAVE_TRITON and K.INTERPRET)
    assert not K.available_on(torch.device("cpu"))
    stats_fn, nll_fn, name = P.select_stats(torch.device("cpu"))
    assert (stats_fn, nll_fn, name) == (P.paired_token_stats, P.token_nll, "torch")
    if not K.HAVE_TRITON:
        with pytest.raises(RuntimeError, match="Triton"):
            K.fused_paired_token_stats(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("v", [50, 64, 200])  # a tail block only, whole blocks only, both (interpreter BLOCK_V 64)
def test_fused_stats_equal_torch_and_float64(dtype, v):
    ref, cand, targets = random_pair(24, v, dtype, seed=v)
    got = K.fused_paired_token_stats(ref, cand, targets)
    assert_same_stats(got, P.paired_token_stats(ref, cand, targets))
    want = float64_paired(ref, cand, targets)
    for k in PAIRED:
        np.testing.assert_allclose(got[k].cpu().numpy(), want[k], err_msg=k, **TOL[k])
    assert got["kld"].min() >= 0 and got["kld"].mean() > 1e-3 and 0 < got["same_top1"].mean() < 1
    np.testing.assert_allclose(K.fused_token_nll(cand, targets).cpu().numpy(), want["nll"], **TOL["nll"])


@needs_kernel
def test_fused_kld_is_exactly_zero_against_itself():
    ref, _, targets = random_pair(16, 150, torch.bfloat16, seed=3, scale=8)
    s = K.fused_paired_token_stats(ref, ref.clone(), targets)
    assert s["kld"].abs().max() == 0 and s["delta_p"].abs().max() == 0 and s["same_top1"].min() == 1


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_nonfinite_rows_follow_torch(dtype):
    ref, cand, targets = random_pair(12, 150, torch.float32, seed=4)
    ref, cand, targets = ref.cpu(), cand.cpu(), targets.cpu()
    targets[:] = 5
    ref[0, 70] = torch.nan             # NaN in the reference: every value NaN but own_nll
    cand[1, 140] = torch.inf           # +inf in the candidate (in the tail block)
    ref[2, 3] = -torch.inf             # -inf in the reference: own_nll_ref finite, pairs NaN
    cand[3, 100] = -torch.inf          # -inf in the candidate
    cand[4, 5] = -torch.inf            # -inf at the target: NLL inf
    ref[5] = -torch.inf                # a whole row -inf
    cand[6, :64] = -torch.inf          # a whole first block -inf, the target (5) among them
    ref[7, :128] = -torch.inf          # two whole blocks -inf, the rest finite
    cand[8, 0] = ref[8, 0] = torch.nan  # both
    ref, cand, targets = ref.to(DEVICE, dtype), cand.to(DEVICE, dtype), targets.to(DEVICE)
    targets[7] = 130
    got = K.fused_row_stats(ref, cand, targets)
    want = P.paired_token_stats(ref, cand, targets)
    assert_same_stats({k: got[k] for k in K.PAIRED_KEYS}, want)
    assert_same_stats(K.fused_paired_token_stats(ref, cand, targets), want)  # without the finite flags
    for side, z in (("finite_ref", ref), ("finite", cand)):
        assert got[side].tolist() == torch.isfinite(z).all(-1).float().tolist(), side
    bad = set(torch.isnan(got["kld"]).nonzero().flatten().tolist())
    assert bad == {0, 1, 2, 3, 4, 5, 6, 7, 8}
    assert_same_stats({"nll": K.fused_token_nll(ref, targets)}, {"nll": P.token_nll(ref, targets)})
    assert torch.isfinite(K.fused_token_nll(ref, targets)[7])  # -inf blocks before the finite ones


@needs_kernel
def test_fused_top1_takes_the_first_of_tied_maxima():
    v = 200
    ref = torch.zeros(8, v)
    cand = torch.zeros(8, v)
    ref[0, [10, 150]] = 5; cand[0, [10, 150]] = 5            # same ties: same first index
    ref[1, [10, 150]] = 5; cand[1, [150, 190]] = 5           # ties in different blocks: 10 vs 150
    ref[2, [20, 30]] = 5; cand[2, [30, 20]] = 5              # ties in one block, order irrelevant
    ref[3, [130, 140]] = 5; cand[3, 140] = 5                 # 130 vs 140
    ref[4, [199, 60]] = 5; cand[4, 60] = 5                   # tail block tie vs first block
    ref[5] = 1.0; cand[5] = 1.0                              # every logit tied: index 0 on both sides
    ref[6, [10, 74]] = 5; cand[6, 74] = 5                    # one lane, two blocks (interpreter: 64 a block)
    ref[7, [17, 19]] = 5; cand[7, 19] = 5                    # one lane's chunk of 8
    ref, cand = ref.to(DEVICE, torch.bfloat16), cand.to(DEVICE, torch.bfloat16)
    targets = torch.zeros(8, dtype=torch.long, device=DEVICE)
    got = K.fused_paired_token_stats(ref, cand, targets)["same_top1"]
    assert got.tolist() == (ref.argmax(-1) == cand.argmax(-1)).float().tolist() == [1, 0, 1, 0, 1, 1, 0, 0]


@needs_kernel
def test_fused_takes_strided_views_of_a_batch():
    g = torch.Generator().manual_seed(5)
    b, length, v = 3, 9, 130
    ref = (torch.randn(b, length, v, generator=g) * 4).to(DEVICE, torch.bfloat16)
    cand = (ref.float() + 0.5 * torch.randn(b, length, v, generator=g).to(DEVICE)).bfloat16()
    targets = torch.randint(0, v, (b, length), generator=g).to(DEVICE)
    batch = K.fused_paired_token_stats(ref[:, 1:-1], cand[:, 1:-1], targets[:, 2:])  # [B, M, V] views
    for w in range(b):
        rows = K.fused_paired_token_stats(ref[w, 1:-1], cand[w, 1:-1], targets[w, 2:])  # [M, V] view
        want = P.paired_token_stats(ref[w, 1:-1].contiguous(), cand[w, 1:-1].contiguous(), targets[w, 2:].contiguous())
        assert_same_stats(rows, want)
        for k in want:  # rows are computed independently: bit for bit the same in a batch
            assert torch.equal(batch[k].view(b, -1)[w], rows[k]), k
    wide = torch.randn(v, 7, generator=g).to(DEVICE).t()  # last dimension not contiguous: copied
    t7 = torch.arange(7, device=DEVICE)
    assert_same_stats(K.fused_paired_token_stats(wide, wide * 1.1, t7), P.paired_token_stats(wide, wide * 1.1, t7))
    assert torch.equal(K.fused_token_nll(ref[:, 1:-1], targets[:, 2:]).view(b, -1)[1],
                       K.fused_token_nll(ref[1, 1:-1], targets[1, 2:]))


def _pass(variants, windows, reference32=None, **fns):
    return P.measure_pass(variants, windows, torch.device(DEVICE), batch_size=2, reference32=reference32, **fns)


@needs_kernel
@pytest.mark.parametrize("stride", [None, 8])  # all firsts equal (one call a batch) / differing (per window)
def test_measure_pass_with_fused_stats_matches_torch(stride):
    from tests.test_perplexity import TEXT, ByteTokenizer

    fp32 = make_tiny_llama().to(DEVICE)
    other = make_tiny_llama(seed=1).to(DEVICE)
    ids, ends = P.tokenize_corpus(ByteTokenizer(), TEXT)
    windows = P.make_windows(ids, TEXT, ends, P.Protocol(context=16, stride=stride, max_windows=3))
    fused = dict(stats_fn=K.fused_paired_token_stats, nll_fn=K.fused_token_nll)
    per_window = dict(stats_fn=lambda *a: K.fused_paired_token_stats(*a), nll_fn=lambda *a: K.fused_token_nll(*a))
    variants = {"fp": fp32, "other": other}
    got, loop = _pass(variants, windows, **fused), _pass(variants, windows, **per_window)
    want = _pass(variants, windows)
    assert got.nll.keys() == want.nll.keys() and got.pairs.keys() == want.pairs.keys() == {"other"}
    for v in want.nll:
        for g, l, w in zip(got.nll[v], loop.nll[v], want.nll[v], strict=True):
            np.testing.assert_array_equal(g, l)
            np.testing.assert_allclose(g, w, **TOL["nll"])
    for k in want.pairs["other"]:
        for g, l, w in zip(got.pairs["other"][k], loop.pairs["other"][k], want.pairs["other"][k], strict=True):
            np.testing.assert_array_equal(g, l)
            assert g.dtype == w.dtype == np.float32 and g.shape == w.shape
            np.testing.assert_allclose(g, w, err_msg=k, **TOL[k])
    alone = _pass({"fp": fp32}, windows, **fused)  # fp only: the fused token NLL
    for g, w in zip(alone.nll["fp"], want.nll["fp"], strict=True):
        np.testing.assert_allclose(g, w, **TOL["nll"])
    bf16 = _pass({"fp": make_tiny_llama().to(DEVICE).bfloat16()}, windows, reference32=fp32, **fused)
    ref = _pass({"fp": make_tiny_llama().to(DEVICE).bfloat16()}, windows, reference32=fp32)
    for k in ref.pairs[P.NOISE]:  # float32 reference rows against bfloat16 rows
        for g, w in zip(bf16.pairs[P.NOISE][k], ref.pairs[P.NOISE][k], strict=True):
            np.testing.assert_allclose(g, w, err_msg=k, **TOL[k])


@needs_kernel
def test_run_records_which_statistics_ran(tmp_path, monkeypatch):
    from tests.test_perplexity import make_ctx

    model = make_tiny_llama()
    torch_ctx = make_ctx({"fp": model}, tmp_path, ppl_context=16, ppl_windows=2)
    P.run(torch_ctx)
    monkeypatch.setattr(K, "available_on", lambda device: True)  # as on a CUDA device
    fused_ctx = make_ctx({"fp": model}, tmp_path, ppl_context=16, ppl_windows=2)
    P.run(fused_ctx)
    assert torch_ctx.results.details["ppl"]["protocol"]["stats"] == "torch"
    assert fused_ctx.results.details["ppl"]["protocol"]["stats"] == "triton-fused"
    a = torch_ctx.results.get("ppl", "corpus", "fp", "token_ppl")
    b = fused_ctx.results.get("ppl", "corpus", "fp", "token_ppl")
    assert a.n == b.n and b.value == pytest.approx(a.value, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not K.HAVE_TRITON, reason="needs Triton")
def test_gpu_fused_stats_match_torch_on_a_real_vocabulary():
    """4096 tokens x 49152 logits (SmolLM2's vocabulary) in bf16, logits on an LM's scale."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, v = 4096, 49152
    ref = (torch.randn(n, v, device="cuda", generator=g) * 4 + 5).bfloat16()
    cand = (ref.float() + 0.15 * torch.randn(n, v, device="cuda", generator=g)).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::2] = ref[::2].float().argmax(-1)  # half the targets likely, as in text
    ref[7, 123] = torch.nan
    ref[9, [100, 103]] = 100; cand[9, 103] = 100      # tied maxima in one 8-logit chunk
    ref[10, [100, 16484]] = 100; cand[10, 16484] = 100  # in one lane of two blocks (blocks divide 16384)
    got, want = K.fused_paired_token_stats(ref, cand, targets), P.paired_token_stats(ref, cand, targets)
    # same_top1 is exact (comparisons of the same bf16 values); the rest differ by float32 summation
    # order over 49152 terms: ~1e-6 relative in the sums, i.e. a few 1e-6 nats in NLL and KL
    assert_same_stats(got, want)
    assert torch.isnan(got["kld"]).nonzero().flatten().tolist() == [7]
    assert got["same_top1"][9] == got["same_top1"][10] == 0
    mean_gap = (got["kld"] - want["kld"]).nan_to_num().abs().mean().item()
    assert mean_gap < 1e-6 * max(1.0, want["kld"].nanmean().item())
    assert P.select_stats(torch.device("cuda"))[2] == "triton-fused"
    for len_v in (128256, 1000):  # a 128k vocabulary, and one below every block size
        r = torch.randn(64, len_v, device="cuda").bfloat16()
        t = torch.randint(0, len_v, (64,), device="cuda")
        assert_same_stats(K.fused_paired_token_stats(r, r * 0.9, t), P.paired_token_stats(r, r * 0.9, t))
