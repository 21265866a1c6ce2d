"""Stage ppl: perplexity per variant, KL divergence and friends against fp, the noise floor, bad input."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax
from scipy.special import rel_entr

from evalsuite.app.config import RunConfig
from evalsuite.errors import EvalsuiteError
from evalsuite.load.model import LoadedModel, ModelInfo
from evalsuite.measure import perplexity as P
from evalsuite.measure.context import RunContext
from evalsuite.results import Results
from tests.conftest import make_tiny_llama

TEXT = (
    "The quick brown fox jumps over the lazy dog . It was a bright cold day in April , and the clocks were "
    "striking thirteen . \n = History = \n All happy families are alike ; each unhappy family is unhappy in "
    "its own way . Call me Ishmael . Some years ago , never mind how long precisely , having little money "
    "in my purse , I thought I would sail about a little and see the watery part of the world . "
) * 2


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255, fits tiny_llama's vocabulary); ASCII text keeps char offsets
    equal to byte offsets. ``bos`` makes it prepend a BOS id of its own, as some tokenizers do."""

    def __init__(self, bos: int | None = None):
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, verbose=True):
        ids = list(text.encode("utf-8"))
        out = {"input_ids": ([self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []) + ids}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(ids))]
        return out

    def decode(self, ids):
        return bytes(ids).decode("utf-8", "replace")


def make_ctx(variants, tmp_path, text=TEXT, tokenizer=None, dtype=torch.float32, reload=None, **options) -> RunContext:
    corpus = tmp_path / "corpus.txt"
    if text is not None:
        corpus.write_text(text)
    opts = dict(ppl_corpus=str(corpus), ppl_context=64, ppl_stride=None, ppl_score="all", ppl_windows=None,
                ppl_batch=None, ppl_noise_floor=True, seed=0)
    opts.update(options)
    fp = variants["fp"]
    info = ModelInfo(path="tiny", format="hf", name="tiny", sha256="0", n_params=0, arch="llama",
                     vocab_size=fp.config.vocab_size, max_seq_len=fp.config.max_position_embeddings)
    return RunContext(loaded=LoadedModel(fp, tokenizer or ByteTokenizer(), info), variants=variants, configs={},
                      device=torch.device("cpu"), dtype=dtype, config=RunConfig.of_options(**opts),
                      results=Results(run={"schemes": [v for v in variants if v != "fp"]}), reload=reload,
                      show_progress=False)


def value(ctx, variant, metric, task="corpus"):
    return ctx.results.get("ppl", task, variant, metric).value


def scored_tokens(windows: P.Windows) -> list[np.ndarray]:
    """Corpus index of every scored token, per window (independent of make_windows' arithmetic)."""
    ctxlen = windows.input_ids.shape[1]
    return [np.arange(s + f - int(windows.bos), s + ctxlen - int(windows.bos)) for s, f in zip(windows.start, windows.first)]


def reference_loop(model, ids: np.ndarray, windows: P.Windows):
    """Per-window float64 NLL sums from a plain loop: cross-entropy of each window's scored positions."""
    sums = []
    for w, idx in zip(windows.input_ids, scored_tokens(windows)):
        logits = model(input_ids=w[None]).logits[0].double()
        first = len(w) - len(idx)
        nll = torch.nn.functional.cross_entropy(logits[first - 1: -1], w[first:], reduction="sum")
        assert torch.equal(w[first:], torch.as_tensor(ids[idx]))
        sums.append(float(nll))
    return np.asarray(sums)




def numpy_paired(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    lp, lq = np_log_softmax(ref.astype(np.float64), -1), np_log_softmax(cand.astype(np.float64), -1)
    rows = np.arange(len(targets))
    return {
        "kld": rel_entr(np.exp(lp), np.exp(lq)).sum(-1),
        "delta_p": np.exp(lq[rows, targets]) - np.exp(lp[rows, targets]),
        "same_top1": (ref.argmax(-1) == cand.argmax(-1)).astype(float),
        "nll_ref": -lp[rows, targets],
        "nll": -lq[rows, targets],
    }


def test_paired_token_stats_match_float64_numpy():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 37, generator=g) * 3
    cand = ref + 0.3 * torch.randn(50, 37, generator=g)
    targets = torch.randint(0, 37, (50,), generator=g)
    got = P.paired_token_stats(ref, cand, targets)
    want = numpy_paired(ref.numpy(), cand.numpy(), targets.numpy())
    for k, w in want.items():
        np.testing.assert_allclose(got[k].numpy(), w, rtol=1e-4, atol=2e-6, err_msg=k)
    assert (got["kld"] >= 0).all() and got["kld"].mean() > 1e-3
    assert 0 < got["same_top1"].mean() < 1
    np.testing.assert_allclose(P.token_nll(cand, targets).numpy(), want["nll"], rtol=1e-5, atol=1e-6)


def test_kld_is_zero_against_itself_and_never_negative():
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(64, 50, generator=g) * 5).bfloat16()
    t = torch.randint(0, 50, (64,), generator=g)
    same = P.paired_token_stats(a, a.clone(), t)
    assert same["kld"].abs().max() == 0 and same["same_top1"].min() == 1 and same["delta_p"].abs().max() == 0
    near = P.paired_token_stats(a, a + 1e-3 * torch.randn(64, 50, generator=g).bfloat16(), t)
    assert (near["kld"] >= 0).all()


def test_nonfinite_logits_mark_only_their_tokens():
    g = torch.Generator().manual_seed(2)
    ref, cand = torch.randn(8, 11, generator=g), torch.randn(8, 11, generator=g)
    cand[3, 4] = torch.nan
    ref[5, 0] = torch.inf
    s = P.paired_token_stats(ref, cand, torch.zeros(8, dtype=torch.long))
    for k in ("kld", "delta_p", "same_top1", "nll_ref", "nll"):
        assert torch.isnan(s[k]).nonzero().flatten().tolist() == [3, 5], k
    assert torch.isnan(s["own_nll"]).nonzero().flatten().tolist() == [3]
    assert torch.isnan(s["own_nll_ref"]).nonzero().flatten().tolist() == [5]




@pytest.mark.parametrize("protocol", [
    P.Protocol(context=32), P.Protocol(context=32, stride=8), P.Protocol(context=32, score="second-half"),
    P.Protocol(context=32, max_windows=3),
])
@pytest.mark.parametrize("bos", [None, 1])
def test_windows_score_each_token_at_most_once(protocol, bos):
    tok = ByteTokenizer(bos)
    ids, ends = P.tokenize_corpus(tok, TEXT)
    w = P.make_windows(ids, TEXT, ends, protocol, P.tokenizer_bos(tok))
    assert w.bos == (bos is not None) and w.input_ids.shape[1] == 32
    scored = scored_tokens(w)
    flat = np.concatenate(scored)
    assert len(np.unique(flat)) == len(flat) == w.n_scored.sum()
    for x, idx in zip(w.input_ids, scored):
        assert torch.equal(x[32 - len(idx):], torch.as_tensor(ids[idx]))
        if bos is not None:
            assert x[0] == bos
    if protocol.score == "second-half":
        assert (w.first == 16).all()
    elif protocol.max_windows is None:
        # disjoint without BOS skips each window's first token; strided or BOS windows score every token
        expect = len(ids) - w.n_tail_unscored - (bos is None)
        if protocol.stride is None and bos is None:
            expect -= len(w) - 1
        assert len(flat) == expect
    else:
        assert len(w) == 3
    word_starts = np.asarray([m.start() for m in re.finditer(r"\S+", TEXT)])
    for idx, words, nbytes in zip(scored, w.n_words, w.n_bytes):
        begin, end = (idx[0] if idx[0] > 0 else 0), idx[-1] + 1  # byte tokens: token i is char i
        assert words == ((word_starts >= begin) & (word_starts < end)).sum()
        assert nbytes == len(TEXT[begin:end].encode())


def test_windows_reject_a_corpus_shorter_than_one_window():
    ids, ends = P.tokenize_corpus(ByteTokenizer(), "short text")
    with pytest.raises(EvalsuiteError, match="fewer than one window"):
        P.make_windows(ids, "short text", ends, P.Protocol(context=64))
    with pytest.raises(EvalsuiteError, match="--ppl-stride"):
        P.make_windows(ids, "short text", ends, P.Protocol(context=4, stride=9))




def test_token_and_word_ppl_match_a_simple_loop(tmp_path):
    model = make_tiny_llama()
    ctx = make_ctx({"fp": model}, tmp_path, ppl_stride=32)
    P.run(ctx)
    ids, ends = P.tokenize_corpus(ctx.tokenizer, TEXT)
    w = P.make_windows(ids, TEXT, ends, P.Protocol(context=64, stride=32))
    sums = reference_loop(model, ids, w)
    n_tokens = sum(len(i) for i in scored_tokens(w))
    assert value(ctx, "fp", "token_ppl") == pytest.approx(math.exp(sums.sum() / n_tokens), rel=1e-5)
    assert value(ctx, "fp", "nll_mean") == pytest.approx(sums.sum() / n_tokens, rel=1e-5)
    # strided windows score every token after the first (byte 0, so "The" is not a scored word) up to the last one
    end = scored_tokens(w)[-1][-1] + 1
    words = sum(1 for m in re.finditer(r"\S+", TEXT) if 1 <= m.start() < end)
    assert value(ctx, "fp", "word_ppl") == pytest.approx(math.exp(sums.sum() / words), rel=1e-5)
    assert value(ctx, "fp", "bits_per_byte") == pytest.approx(sums.sum() / (end - 1) / math.log(2), rel=1e-5)
    lo, hi = ctx.results.get("ppl", "corpus", "fp", "token_ppl").ci95
    assert lo <= value(ctx, "fp", "token_ppl") <= hi
    np.testing.assert_allclose(ctx.results.details["ppl"]["variants"]["fp"]["nll_sum"], sums, rtol=1e-5)


def test_word_ppl_and_bits_per_byte_follow_lm_eval_aggregation(tmp_path):
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    ctx = make_ctx({"fp": make_tiny_llama()}, tmp_path)
    P.run(ctx)
    d = ctx.results.details["ppl"]
    lls = [-x for x in d["variants"]["fp"]["nll_sum"]]
    assert value(ctx, "fp", "word_ppl") == pytest.approx(weighted_perplexity(list(zip(lls, d["windows"]["n_words"]))))
    assert value(ctx, "fp", "bits_per_byte") == pytest.approx(bits_per_byte(list(zip(lls, d["windows"]["n_bytes"]))))
    # lm-eval's wikitext word count, len(re.split(r"\s+", page)), agrees on text without edge whitespace
    from evalsuite.measure.corpus import char_prefix_counts

    page = TEXT.strip() + " caf\u00e9 \u65e5\u672c\u8a9e\u3000x"
    n_bytes, n_words = char_prefix_counts(page)
    assert n_words[-1] == len(re.split(r"\s+", page)) and n_bytes[-1] == len(page.encode("utf-8"))


def test_model_against_itself_has_zero_kld_and_fp32_noise_floor_is_stated(tmp_path):
    model = make_tiny_llama()
    ctx = make_ctx({"fp": model, "same": copy.deepcopy(model)}, tmp_path)
    P.run(ctx)
    assert value(ctx, "same", "kld_mean") == 0 and value(ctx, "same", "kld_max") == 0
    assert value(ctx, "same", "same_top1") == 1 and value(ctx, "same", "ppl_ratio") == 1
    assert value(ctx, "same", "delta_p_rms") == 0 and value(ctx, "same", "nonfinite_tokens") == 0
    assert value(ctx, "same", "token_ppl") == value(ctx, "fp", "token_ppl")
    noise = ctx.results.get("ppl", "corpus", P.NOISE, "kld_mean")
    assert noise.value == 0 and noise.extra["trivial"] and "float32" in noise.extra["reason"]
    assert "trivial" in ctx.results.details["ppl"]["protocol"]["noise_floor"]
    assert not ctx.results.errors


def test_paired_statistics_agree_with_numpy_over_windows(tmp_path):
    model, other = make_tiny_llama(seed=0), make_tiny_llama(seed=0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ctx = make_ctx({"fp": model, "perturbed": other}, tmp_path, ppl_batch=2)
    P.run(ctx)
    ids, ends = P.tokenize_corpus(ctx.tokenizer, TEXT)
    w = P.make_windows(ids, TEXT, ends, P.Protocol(context=64))
    per_token = []
    for x, idx in zip(w.input_ids, scored_tokens(w)):
        first = len(x) - len(idx)
        a = model(input_ids=x[None]).logits[0, first - 1: -1].numpy()
        b = other(input_ids=x[None]).logits[0, first - 1: -1].numpy()
        per_token.append(numpy_paired(a, b, x[first:].numpy()))
    cat = {k: np.concatenate([t[k] for t in per_token]) for k in per_token[0]}
    assert value(ctx, "perturbed", "kld_mean") == pytest.approx(cat["kld"].mean(), rel=1e-4)
    assert value(ctx, "perturbed", "kld_p99") == pytest.approx(np.percentile(cat["kld"], 99), rel=1e-3)
    assert value(ctx, "perturbed", "kld_max") == pytest.approx(cat["kld"].max(), rel=1e-4)
    assert value(ctx, "perturbed", "delta_p_mean") == pytest.approx(cat["delta_p"].mean(), rel=1e-3, abs=1e-7)
    assert value(ctx, "perturbed", "delta_p_rms") == pytest.approx(np.sqrt((cat["delta_p"] ** 2).mean()), rel=1e-4)
    assert value(ctx, "perturbed", "same_top1") == pytest.approx(cat["same_top1"].mean())
    ln_ratio = cat["nll"].mean() - cat["nll_ref"].mean()
    assert value(ctx, "perturbed", "ln_ppl_ratio") == pytest.approx(ln_ratio, rel=1e-4, abs=1e-7)
    rec = ctx.results.get("ppl", "corpus", "perturbed", "ppl_ratio")
    assert rec.value == pytest.approx(math.exp(ln_ratio), rel=1e-6)
    assert rec.ci95[0] <= rec.value <= rec.ci95[1] and rec.ci95[0] < rec.ci95[1]
    kld = ctx.results.get("ppl", "corpus", "perturbed", "kld_mean")
    assert kld.extra["percentiles"]["p50"] == pytest.approx(np.median(cat["kld"]), rel=1e-3)
    hist = ctx.results.details["ppl"]["paired"]["perturbed"]["kld_hist"]
    assert sum(hist["counts"]) == cat["kld"].size == kld.n


def test_bf16_run_measures_the_noise_floor_against_float32(tmp_path):
    model32 = make_tiny_llama()
    ctx = make_ctx({"fp": copy.deepcopy(model32).bfloat16()}, tmp_path, dtype=torch.bfloat16,
                   reload=lambda dtype: copy.deepcopy(model32).to(dtype))
    P.run(ctx)
    noise = ctx.results.get("ppl", "corpus", P.NOISE, "kld_mean")
    assert 0 < noise.value < 0.01 and "trivial" not in noise.extra
    assert ctx.results.details["ppl"]["protocol"]["noise_floor"].startswith("measured")
    assert ctx.results.details["ppl"]["paired"][P.NOISE]["reference"] == "fp in float32"


def test_stage_says_where_its_device_time_went(tmp_path):
    """details.ppl.seconds splits the paired pass into each variant's forwards, the float32
    reference's and the statistics; a variant's forwards are timed under its own label."""
    model32 = make_tiny_llama()
    quant = copy.deepcopy(model32).bfloat16()
    ctx = make_ctx({"fp": copy.deepcopy(model32).bfloat16(), "int8-wo": quant}, tmp_path, dtype=torch.bfloat16,
                   reload=lambda dtype: copy.deepcopy(model32).to(dtype))
    P.run(ctx)
    phases = ctx.results.details["ppl"]["seconds"]["paired_pass_device"]
    assert set(phases) == {"forward fp", "forward int8-wo", "forward fp32 reference", "statistics"}
    assert all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= ctx.results.details["ppl"]["seconds"]["paired_pass"] + 1e-3


def test_nonfinite_logits_are_counted_and_reported_not_averaged(tmp_path):
    model = make_tiny_llama()
    broken, dead = copy.deepcopy(model), copy.deepcopy(model)
    calls = []

    def nan_once(module, inputs, output):  # the very first position of the first window only
        calls.append(1)
        if len(calls) == 1:
            output[0, 0, :] = torch.nan
        return output

    broken.lm_head.register_forward_hook(nan_once)
    dead.lm_head.weight.data[7] = torch.inf
    ctx = make_ctx({"fp": model, "broken": broken, "dead": dead}, tmp_path)
    P.run(ctx)
    assert value(ctx, "broken", "nonfinite_tokens") == 1 and value(ctx, "fp", "nonfinite_tokens") == 0
    assert math.isfinite(value(ctx, "broken", "token_ppl")) and math.isfinite(value(ctx, "broken", "kld_mean"))
    assert ctx.results.get("ppl", "corpus", "broken", "kld_mean").n == ctx.results.get("ppl", "corpus", "fp", "token_ppl").n - 1
    assert value(ctx, "dead", "token_ppl") is None and value(ctx, "dead", "kld_mean") is None
    assert value(ctx, "dead", "nonfinite_tokens") == ctx.results.get("ppl", "corpus", "fp", "token_ppl").n
    messages = [e["message"] for e in ctx.results.errors]
    assert any(m.startswith("broken: 1 of") for m in messages) and any(m.startswith("dead:") for m in messages)
    ctx.results.save(tmp_path / "results.json")  # no NaN reaches the JSON
    assert Results.load(tmp_path / "results.json").get("ppl", "corpus", "dead", "token_ppl").value is None


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "no such corpus"),
    (lambda p: p.write_text("  \n"), "empty"),
    (lambda p: p.write_bytes(b"caf\xe9 " * 100), "not UTF-8"),
    (lambda p: p.write_text("too short"), "fewer than one window"),
])
def test_bad_corpus_is_a_clear_error(tmp_path, setup, match):
    ctx = make_ctx({"fp": make_tiny_llama()}, tmp_path, text=None)
    setup(tmp_path / "corpus.txt")
    with pytest.raises(EvalsuiteError, match=match):
        P.run(ctx)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(EvalsuiteError, match="longer than the model"):
        P.run(make_ctx({"fp": make_tiny_llama()}, tmp_path, ppl_context=4096))
    with pytest.raises(EvalsuiteError, match="unknown corpus"):
        P.run(make_ctx({"fp": make_tiny_llama()}, tmp_path, ppl_corpus="wikitext3"))
    with pytest.raises(EvalsuiteError, match="second-half"):
        P.run(make_ctx({"fp": make_tiny_llama()}, tmp_path, ppl_score="second-half", ppl_stride=8))




@pytest.mark.slow
def test_smollm2_int8_is_close_and_a_zeroed_layer_is_not(smollm2, data_dir, tmp_path):
    from evalsuite.quantize import parse_scheme, quantize_

    torch.manual_seed(0)
    text = (data_dir / "wikitext-2" / "test.txt").read_text()[:6000]
    int8 = quantize_(copy.deepcopy(smollm2.model), parse_scheme("int8-wo"))
    faulty = copy.deepcopy(smollm2.model)
    faulty.model.layers[5].mlp.down_proj.weight.data.zero_()
    variants = {"fp": smollm2.model, "int8-wo": int8, "zeroed-layer": faulty}
    ctx = make_ctx(variants, tmp_path, text=text, tokenizer=smollm2.tokenizer, ppl_context=128, ppl_windows=3)
    ctx.loaded = LoadedModel(smollm2.model, smollm2.tokenizer, smollm2.info)
    P.run(ctx)
    assert 10 < value(ctx, "fp", "token_ppl") < 100
    tokens_per_word = math.log(value(ctx, "fp", "word_ppl")) / math.log(value(ctx, "fp", "token_ppl"))
    assert 1 < tokens_per_word < 2
    kld8, kld_bad = value(ctx, "int8-wo", "kld_mean"), value(ctx, "zeroed-layer", "kld_mean")
    assert 0 < kld8 < 0.02 and value(ctx, "int8-wo", "same_top1") > 0.9
    # KLD sees the fault even where perplexity barely moves (here ppl_ratio is about 0.99 on 381 tokens)
    assert kld_bad > 10 * kld8 and value(ctx, "zeroed-layer", "same_top1") < value(ctx, "int8-wo", "same_top1")
    assert value(ctx, "int8-wo", "ppl_ratio") == pytest.approx(
        value(ctx, "int8-wo", "token_ppl") / value(ctx, "fp", "token_ppl"), rel=1e-6)
    assert ctx.results.details["ppl"]["protocol"]["bos"] is False  # SmolLM2's tokenizer adds no BOS


@pytest.mark.gpu
def test_gpu_bf16_pass_matches_cpu_fp32_and_measures_the_noise_floor(smollm2, smollm2_path, data_dir, tmp_path):
    from evalsuite.load import load_model
    from evalsuite.quantize import parse_scheme, quantize_

    text = (data_dir / "wikitext-2" / "test.txt").read_text()[:20000]
    cuda = torch.device("cuda")
    gpu = load_model(smollm2_path, device=cuda, dtype=torch.bfloat16)
    variants = {"fp": gpu.model, "int8-wo": quantize_(copy.deepcopy(gpu.model), parse_scheme("int8-wo"))}
    ctx = make_ctx(variants, tmp_path, text=text, tokenizer=gpu.tokenizer, dtype=torch.bfloat16, ppl_context=512,
                   ppl_windows=4, reload=lambda d: load_model(smollm2_path, device=cuda, dtype=d).model)
    ctx.loaded, ctx.device = gpu, cuda
    P.run(ctx)
    cpu = make_ctx({"fp": smollm2.model}, tmp_path, text=text, tokenizer=smollm2.tokenizer, ppl_context=512,
                   ppl_windows=4)
    cpu.loaded = smollm2
    P.run(cpu)
    assert value(ctx, "fp", "token_ppl") == pytest.approx(value(cpu, "fp", "token_ppl"), rel=0.03)
    noise, kld8 = value(ctx, P.NOISE, "kld_mean"), value(ctx, "int8-wo", "kld_mean")
    assert 0 < noise < 0.05 and 0 < kld8 < 0.05 and value(ctx, "int8-wo", "same_top1") > 0.9
    assert not ctx.results.errors


def test_noise_floor_off_or_unavailable_is_stated(tmp_path):
    def fail(dtype):
        raise RuntimeError("CUDA out of memory")

    off = make_ctx({"fp": make_tiny_llama().bfloat16()}, tmp_path, dtype=torch.bfloat16, ppl_noise_floor=False)
    P.run(off)
    assert off.results.details["ppl"]["protocol"]["noise_floor"].startswith("off") and not off.results.errors
    assert not off.results.find(variant=P.NOISE)
    failed = make_ctx({"fp": make_tiny_llama().bfloat16()}, tmp_path, dtype=torch.bfloat16, reload=fail)
    P.run(failed)
    assert "out of memory" in failed.results.details["ppl"]["protocol"]["noise_floor"]
    assert [e["variant"] for e in failed.results.errors] == [P.NOISE]
    assert value(failed, "fp", "token_ppl") > 1


@pytest.mark.parametrize("context, vocab, fused, want", [
    (2048, 49152, True, 16),    # SmolLM2: capped at 32768 positions
    (2048, 128256, True, 8),    # Llama-3: 4 GiB of bf16 logits
    (2048, 49152, False, 8),    # torch statistics write float32 matrices: half
    (4096, 262144, True, 2),
    (8192, 262144, False, 1),   # never below one window
])
def test_gpu_batch_keeps_one_models_logits_near_the_budget(context, vocab, fused, want):
    from evalsuite.measure.perplexity import GPU_LOGITS_BYTES, GPU_POSITIONS_PER_BATCH, gpu_windows_per_batch

    got = gpu_windows_per_batch(context, vocab, fused)
    assert got == want
    budget = min(GPU_POSITIONS_PER_BATCH * 2 * vocab, GPU_LOGITS_BYTES) // (1 if fused else 2)
    assert got == 1 or got * context * vocab * 2 <= budget


def test_noise_floor_subsample_is_seeded_spread_and_sized_by_its_rule():
    from evalsuite.measure import noise_floor as NF

    from scipy import stats as sps

    n = NF.sample_size(152)  # WikiText-2 at 2048 for SmolLM2
    half = lambda k: sps.t.ppf(0.975, k - 1) * NF.PLAN_CV / math.sqrt(k)  # the planned relative half-width
    assert n >= NF.MIN_WINDOWS and half(n) <= NF.TARGET_REL_HALF_WIDTH and n < 152 / 10
    assert n == NF.MIN_WINDOWS or half(n - 1) > NF.TARGET_REL_HALF_WIDTH  # the smallest such n
    assert NF.sample_size(152, cv=0.3) > n and half(NF.sample_size(152, cv=0.3)) <= NF.TARGET_REL_HALF_WIDTH
    picked = NF.sample_windows(152, seed=3)
    assert len(picked) == n and len(set(picked.tolist())) == n and np.all(np.diff(picked) > 0)
    edges = np.linspace(0, 152, n + 1).round()
    assert np.all((picked >= edges[:-1]) & (picked < edges[1:]))  # one window per stratum: spread
    assert np.array_equal(picked, NF.sample_windows(152, seed=3))
    assert not np.array_equal(picked, NF.sample_windows(152, seed=4))
    assert NF.sample_windows(NF.MIN_WINDOWS, seed=0).tolist() == list(range(NF.MIN_WINDOWS))  # small corpora: every window
    assert NF.sample_size(0) == 0


def _long_text(n_words: int = 1400, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = TEXT.split()
    return " ".join(rng.choice(words, n_words))


NF_TARGET = P.noise_floor.TARGET_REL_HALF_WIDTH


def test_noise_floor_subsample_ci_contains_the_full_floor_and_changes_nothing_else(tmp_path):
    model32 = make_tiny_llama()
    text = _long_text(380)

    def run(mode):
        ctx = make_ctx({"fp": copy.deepcopy(model32).bfloat16()}, tmp_path, text=text, dtype=torch.bfloat16,
                       reload=lambda dtype: copy.deepcopy(model32).to(dtype), ppl_noise_floor=mode, ppl_context=32, ppl_batch=16)
        P.run(ctx)
        return ctx

    full, sample = run("full"), run("sample")
    n_windows = len(full.results.details["ppl"]["windows"]["start"])
    f, s = (c.results.get("ppl", "corpus", P.NOISE, "kld_mean") for c in (full, sample))
    assert n_windows > 40 and s.extra["noise_floor"]["windows"] < n_windows / 4
    assert f.n == full.results.get("ppl", "corpus", "fp", "token_ppl").n > s.n
    assert s.ci95[0] <= f.value <= s.ci95[1] and s.ci95[0] < s.ci95[1]
    about = s.extra["noise_floor"]
    assert about["mode"] == "sample" and "stratum" in about["rule"] and about["ci_rel_half_width"] is not None
    assert about["target_met"] == (about["ci_rel_half_width"] <= NF_TARGET)
    assert "Student's t" in s.definition  # a handful of windows: not the bootstrap's interval
    assert sample.results.details["ppl"]["paired"][P.NOISE]["windows"] == \
        P.noise_floor.sample_windows(n_windows, 0).tolist()
    assert "seeded subsample of" in s.definition and "seeded subsample of" not in f.definition
    # the subsample touches the floor only: fp's own records are those of the full run
    for metric in ("token_ppl", "word_ppl", "bits_per_byte"):
        assert value(sample, "fp", metric) == value(full, "fp", metric)


def test_noise_reference_is_the_checkpoint_upcast_when_stored_in_the_run_dtype(tmp_path):
    from evalsuite.measure import noise_floor as NF

    bf16 = make_tiny_llama().bfloat16()
    bf16.save_pretrained(tmp_path / "bf16")
    make_tiny_llama().save_pretrained(tmp_path / "fp32")
    assert NF.checkpoint_float_dtypes(tmp_path / "bf16") == {torch.bfloat16}
    assert NF.checkpoint_float_dtypes(tmp_path / "fp32") == {torch.float32}
    assert NF.checkpoint_float_dtypes(tmp_path / "nothing-here") is None
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    upcast = NF.upcast_reference(bf16, torch.device("cpu"))
    x = torch.randint(0, 256, (2, 24))
    assert all(p.dtype == torch.float32 for p in upcast.parameters())
    assert torch.equal(upcast(input_ids=x).logits, reloaded(input_ids=x).logits)
    ctx = make_ctx({"fp": bf16}, tmp_path, dtype=torch.bfloat16, reload=None)
    ctx.loaded.info.path = str(tmp_path / "bf16")
    P.run(ctx)  # no reload function at all: the floor is built from the run's own weights
    assert "no reload" in ctx.results.details["ppl"]["protocol"]["noise_floor"]
    assert ctx.results.get("ppl", "corpus", P.NOISE, "kld_mean").value > 0
    ctx.loaded.info.path = str(tmp_path / "fp32")
    assert not NF.can_upcast(ctx)  # an fp32 checkpoint run in bf16: bf16 rounds it, a reload is needed


@pytest.mark.gpu
def test_gpu_bf16_folder_floor_is_upcast_sampled_and_contains_the_full_floor(tmp_path):
    cuda = torch.device("cuda")
    bf16 = make_tiny_llama().bfloat16()
    bf16.save_pretrained(tmp_path / "bf16")
    text = _long_text(380)

    def run(mode):
        ctx = make_ctx({"fp": copy.deepcopy(bf16).to(cuda)}, tmp_path, text=text, dtype=torch.bfloat16, reload=None,
                       ppl_noise_floor=mode, ppl_context=32)
        ctx.device = cuda
        ctx.loaded.info.path = str(tmp_path / "bf16")
        P.run(ctx)
        return ctx

    full, sample = run("full"), run("sample")
    f, s = (c.results.get("ppl", "corpus", P.NOISE, "kld_mean") for c in (full, sample))
    assert "no reload" in sample.results.details["ppl"]["protocol"]["noise_floor"]
    assert f.value > 0 and s.ci95[0] <= f.value <= s.ci95[1] and s.n < f.n


def test_a_nan_window_leaves_a_valid_results_file_and_a_verdict_naming_it(tmp_path, monkeypatch):
    """A NaN in a per-window sum (the measuring function planted to return one) used to make the
    save raise; now the file is whole, the window's sum is null and counted, and the gated checks
    on it are not PASS and say why."""
    from evalsuite.judge.checks import PASS
    from evalsuite.judge.config import DEFAULTS, GateConfig
    from evalsuite.judge.within import ppl_checks

    model = make_tiny_llama()
    ctx = make_ctx({"fp": model, "int8-wo": copy.deepcopy(model)}, tmp_path, ppl_noise_floor=False)
    real_sums = P._sums

    def planted(per_window, *args):
        out = real_sums(per_window, *args)
        out[0] = math.nan
        return out

    monkeypatch.setattr(P, "_sums", planted)
    P.run(ctx)
    ctx.results.save(tmp_path / "results.json")
    saved = Results.load(tmp_path / "results.json")
    assert saved.get("ppl", "corpus", "fp", "token_ppl") is not None and saved.get("ppl", "corpus", "int8-wo", "kld_mean")
    assert saved.details["ppl"]["variants"]["fp"]["nll_sum"][0] is None
    assert saved.nonfinite["details/ppl/variants/fp/nll_sum"] == 1
    checks = ppl_checks(saved, "int8-wo", GateConfig(copy.deepcopy(DEFAULTS)).scheme("int8-wo")[1], "int8-wo*")
    kld = next(c for c in checks if c.metric == "kld_mean")
    assert kld.verdict != PASS and "not finite" in kld.reason, kld.reason
