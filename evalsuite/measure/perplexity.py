"""Stage ``ppl``: perplexity of every variant and KL divergence of each quantized variant from fp.

One pass over the corpus: each batch of windows runs through the fp model once, and each quantized
variant is compared with those fp logits token by token while both are on the device, so nothing of
size vocabulary x tokens is ever kept (llama.cpp's ``--kl-divergence`` writes a multi-GB logits file
instead). Per window only per-token scalars leave the device.

Protocol (stated in every record's definition):
- the corpus is tokenized once as a whole, without special tokens; where the tokenizer adds a BOS
  token by itself, every window starts with BOS and then holds ``context - 1`` corpus tokens;
- windows hold ``context`` positions and start every ``stride`` corpus tokens (default: ``stride``
  = window length, disjoint windows as in the GPTQ/AWQ papers); a window scores position p (the
  prediction of token p from positions < p) for p >= ``first``: ``first`` = 1 for the first window
  and for disjoint windows, ``context - stride`` for later overlapping windows (each token is scored
  once), or ``context // 2`` in every window with ``--ppl-score second-half`` (llama.cpp's rule);
- corpus tokens after the last whole window are not scored (their count is reported).

Definitions (natural logs; NLL = -log p(token | context), in float32 from a float32 log-softmax):
- token_ppl = exp(sum NLL / scored tokens); nll_mean = sum NLL / scored tokens (nats/token);
- word_ppl = exp(sum NLL / words of the scored text), bits_per_byte = sum NLL / (ln 2 x UTF-8 bytes of
  the scored text), the aggregations of lm-eval's wikitext task; the scored text of a window is the
  text after its last context token up to the end of its last scored token, and a word is a maximal
  run of non-whitespace characters (lm-eval counts ``re.split(r"\\s+", doc)`` per document, one more
  for leading or trailing whitespace);
- paired, reference P (fp) vs candidate Q (a scheme), per scored token: KLD = sum_x P(x) ln(P(x)/Q(x))
  (clamped at 0 against float32 rounding), delta_p = Q(correct) - P(correct), same_top1 = argmax P ==
  argmax Q; ppl_ratio = token_ppl(Q) / token_ppl(P) on the tokens both score, ln_ppl_ratio its log;
- the noise floor, variant ``fp@noise``: the same paired statistics for fp in the run's dtype (Q)
  against fp in float32 (P), so "KLD zero" has a scale; by default on a seeded subsample of windows
  sized for a +-20% interval (``--ppl-noise-floor sample``; rule and check in
  :mod:`evalsuite.measure.noise_floor`), every window with ``full``;
- 95% intervals by bootstrap over windows (tokens of one window are not independent), paired where a
  statistic compares two variants (the same resampled windows for both);
- a token whose logits hold NaN or inf is excluded from every statistic of that variant (and of its
  pairs), counted in ``nonfinite_tokens`` and reported as an error of the run.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from evalsuite import stats
from evalsuite.distributed import gather, shard
from evalsuite.errors import EvalsuiteError, first_line
from evalsuite.load.model import forward_logits
from evalsuite.kernels import kld as kld_kernel
from evalsuite.measure import Stage, families, fp_cache, noise_floor, tokenization
from evalsuite.measure.phase_timer import PhaseTimer
from evalsuite.measure.tokenization import bos_rule

NOISE = "fp@noise"
PERCENTILES = (100, 99.9, 99, 95, 90, 50, 10, 5, 1, 0.1, 0)
KLD_HIST_EDGES = [0.0, *np.logspace(-8, 2, 41).tolist()]
DELTA_P_HIST_EDGES = np.linspace(-1, 1, 41).tolist()
# default positions per batch on a GPU ([batch, context, vocab] logits per model): as many as keep one
# model's logits in the run's 2-byte dtype near GPU_LOGITS_BYTES, at most GPU_POSITIONS_PER_BATCH
# (16 windows of 2048 for SmolLM2's 49k vocabulary, 8 for a 128k one); the torch statistics (no
# Triton, or --kernels eager) write float32 matrices of the same shape, so they keep half of that
GPU_POSITIONS_PER_BATCH = 32768
GPU_LOGITS_BYTES = 4 << 30



@dataclass(frozen=True)
class Protocol:
    context: int = 2048
    stride: int | None = None  # corpus tokens between window starts; None = disjoint windows
    score: str = "all"  # "all" | "second-half"
    max_windows: int | None = None


@dataclass
class Windows:
    """The corpus cut into windows: ``input_ids[w, p]`` is scored for ``p >= first[w]``."""

    input_ids: torch.Tensor  # [windows, context] int64, on the CPU
    first: np.ndarray  # [windows]
    start: np.ndarray  # [windows] corpus index of each window's first corpus token
    n_words: np.ndarray  # [windows] words of each window's scored text
    n_bytes: np.ndarray  # [windows] UTF-8 bytes of each window's scored text
    n_corpus_tokens: int
    n_tail_unscored: int
    bos: bool
    protocol: Protocol
    source: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_scored(self) -> np.ndarray:
        return self.input_ids.shape[1] - self.first

    def describe(self) -> str:
        p = self.protocol
        ctx = self.input_ids.shape[1]
        if p.score == "second-half":
            rule = f"disjoint {ctx}-token windows scoring positions {ctx // 2}..{ctx - 1} (llama.cpp)"
        elif p.stride is None or p.stride >= ctx - int(self.bos):
            rule = f"disjoint {ctx}-token windows scoring positions 1..{ctx - 1}"
        else:
            rule = (f"{ctx}-token windows every {p.stride} tokens, scoring positions 1..{ctx - 1} of the first and "
                    f"the last {p.stride} of each later one")
        return (f"{self.source}: {rule}, {'BOS first' if self.bos else 'no BOS'}, {len(self)} windows, "
                f"{int(self.n_scored.sum()):,} scored of {self.n_corpus_tokens:,} tokens "
                f"({self.n_tail_unscored:,} after the last window unscored)")


def tokenize_corpus(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Token ids of the whole text without special tokens, and each token's end character offset
    (None where the tokenizer gives no offsets)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ends = np.asarray([e for _, e in enc["offset_mapping"]], dtype=np.int64)
    except (NotImplementedError, TypeError, ValueError, KeyError):
        enc, ends = tokenizer(text, add_special_tokens=False), None
    return np.asarray(enc["input_ids"], dtype=np.int64), ends


def tokenizer_bos(tokenizer) -> int | None:
    """The BOS id each window starts with: the run's rule (:mod:`evalsuite.measure.tokenization`)."""
    return bos_rule(tokenizer).bos_id


def make_windows(ids: np.ndarray, text: str, char_ends: np.ndarray | None, protocol: Protocol,
                 bos_id: int | None = None, source: str = "", decode: Callable | None = None) -> Windows:
    """Cut token ids into windows by ``protocol``; counts words and bytes of each window's scored text
    from the tokens' character offsets (or, without offsets, by decoding the scored tokens)."""
    from evalsuite.measure.corpus import char_prefix_counts

    ctx = protocol.context
    if ctx < 2:
        raise EvalsuiteError(f"--ppl-context {ctx}: a window needs at least 2 tokens")
    bos = bos_id is not None
    length = ctx - int(bos)  # corpus tokens per window
    if protocol.score not in ("all", "second-half"):
        raise EvalsuiteError(f"--ppl-score {protocol.score!r}: expected all or second-half")
    if protocol.score == "second-half" and protocol.stride not in (None, length):
        raise EvalsuiteError("--ppl-score second-half scores disjoint windows; drop --ppl-stride")
    stride = protocol.stride or length
    if not 1 <= stride <= length:
        raise EvalsuiteError(f"--ppl-stride {stride}: must be between 1 and the window's {length} corpus tokens")
    n = len(ids)
    if n < length:
        raise EvalsuiteError(f"{source or 'corpus'}: {n} tokens, fewer than one window of {length}; lower --ppl-context")
    starts = np.arange(0, n - length + 1, stride, dtype=np.int64)
    tail = n - int(starts[-1]) - length
    if protocol.max_windows is not None:
        starts = starts[: protocol.max_windows]
    if protocol.score == "second-half":
        first = np.full(len(starts), ctx // 2, dtype=np.int64)
    else:
        first = np.full(len(starts), max(1, ctx - stride), dtype=np.int64)
        first[0] = 1
    windows = np.stack([ids[s: s + length] for s in starts])
    if bos:
        windows = np.concatenate([np.full((len(starts), 1), bos_id, dtype=np.int64), windows], axis=1)
    # corpus index of the first and last scored token of each window
    lo = starts + first - int(bos)
    hi = starts + length - 1
    if char_ends is not None:
        n_bytes, n_words = char_prefix_counts(text)
        begin = np.where(lo > 0, char_ends[np.maximum(lo - 1, 0)], 0)
        end = char_ends[hi]
        words, nbytes = n_words[end] - n_words[begin], n_bytes[end] - n_bytes[begin]
    else:
        pieces = [decode(ids[a: b + 1].tolist()) for a, b in zip(lo, hi)]
        words = np.asarray([len(t.split()) for t in pieces], dtype=np.int64)
        nbytes = np.asarray([len(t.encode("utf-8")) for t in pieces], dtype=np.int64)
    return Windows(input_ids=torch.from_numpy(windows), first=first, start=starts, n_words=words, n_bytes=nbytes,
                   n_corpus_tokens=n, n_tail_unscored=tail, bos=bos, protocol=protocol, source=source)


# logits per chunk of the torch statistics (float32: 64 MiB a [rows, V] tensor)
STATS_CHUNK_ELEMENTS = 1 << 24


def _row_chunks(n_rows: int, vocab: int) -> list[slice]:
    """Row ranges of at most STATS_CHUNK_ELEMENTS // vocab rows (one at least)."""
    step = max(1, STATS_CHUNK_ELEMENTS // max(1, vocab))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)] or [slice(0, 0)]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of each target under its row of logits [N, V], float32; NaN where the row is not finite.
    Computed STATS_CHUNK_ELEMENTS at a time (see :func:`paired_token_stats`)."""
    parts = [_token_nll_rows(logits[s], targets[s]) for s in _row_chunks(logits.shape[0], logits.shape[-1])]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _token_nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    nll = -logp.gather(-1, targets[:, None])[:, 0]
    return nll.masked_fill(~torch.isfinite(nll), torch.nan)


def paired_token_stats(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token comparison of a candidate (``logits``) with a reference (``ref_logits``), both [N, V].

    Returns float32 vectors of length N: ``kld`` = KL(P_ref || Q) in nats (clamped at 0), ``delta_p`` =
    Q(target) - P(target), ``same_top1`` (1.0 / 0.0), ``nll_ref`` and ``nll``; every one of them is NaN
    for a token whose logits (either side) are not finite. ``own_nll_ref`` and ``own_nll`` are each
    side's NLL, NaN only where that side's own logits are not finite.

    Rows go STATS_CHUNK_ELEMENTS logits at a time: the float32 log-softmax of both sides and their
    temporaries are ~4 x rows x V x 4 bytes: 8.6 GB for a 2,048-token window of a 262k vocabulary
    (Gemma-3) at once, 256 MiB a chunk.
    """
    parts = [_paired_rows(ref_logits[s], logits[s], targets[s])
             for s in _row_chunks(ref_logits.shape[0], ref_logits.shape[-1])]
    return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _paired_rows(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    lp = torch.log_softmax(ref_logits, dim=-1, dtype=torch.float32)
    lq = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    kld = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)
    nll_ref = -lp.gather(-1, targets[:, None])[:, 0]
    nll = -lq.gather(-1, targets[:, None])[:, 0]
    del lp, lq
    same = (ref_logits.argmax(-1) == logits.argmax(-1)).float()
    ok_ref, ok = torch.isfinite(nll_ref), torch.isfinite(nll)
    both = ok_ref & ok & torch.isfinite(kld)
    out = {"kld": kld, "delta_p": torch.exp(-nll) - torch.exp(-nll_ref), "same_top1": same, "nll_ref": nll_ref, "nll": nll}
    out = {k: v.masked_fill(~both, torch.nan) for k, v in out.items()}
    out["own_nll_ref"] = nll_ref.masked_fill(~ok_ref, torch.nan)
    out["own_nll"] = nll.masked_fill(~ok, torch.nan)
    return out


def select_stats(device: torch.device, compile_stats: bool = False, fused: bool = True) -> tuple[Callable, Callable, str]:
    """The per-token statistics a run on ``device`` uses: ``(stats_fn, nll_fn, name)``. On CUDA with
    Triton (and ``fused``, i.e. not ``--kernels eager``) the one-pass fused kernels
    (:mod:`evalsuite.kernels.kld`, equal to float32 rounding); ``compile_stats``
    (``--ppl-compile``) asks for the torch version under torch.compile."""
    if compile_stats:
        return torch.compile(paired_token_stats, dynamic=True), token_nll, "torch-compiled"
    if fused and kld_kernel.available_on(device):
        return kld_kernel.fused_paired_token_stats, kld_kernel.fused_token_nll, "triton-fused"
    return paired_token_stats, token_nll, "torch"


@dataclass
class PassResult:
    """Per-token values of every window, in window order: ``nll[variant][w]`` and
    ``pairs[name][key][w]`` (keys of :func:`paired_token_stats`), as float32 numpy arrays."""

    nll: dict[str, list[np.ndarray]] = field(default_factory=dict)
    pairs: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)


@torch.inference_mode()
def measure_pass(variants: dict[str, nn.Module], windows: Windows, device: torch.device, batch_size: int = 1,
                 reference32: nn.Module | None = None, progress: Callable[[Iterable], Iterable] = lambda it: it,
                 rank: int = 0, world_size: int = 1, stats_fn: Callable = paired_token_stats,
                 nll_fn: Callable = token_nll, noise_windows: Iterable[int] | None = None,
                 timer: PhaseTimer | None = None) -> PassResult:
    """Run every variant over every window once; ``variants`` starts with ``"fp"``, the reference of
    each scheme's pair; ``reference32`` (fp in float32) adds the ``fp@noise`` pair. Windows are split
    round-robin across ranks and gathered back in order. ``stats_fn`` / ``nll_fn`` may be a compiled
    :func:`paired_token_stats` or the fused kernels of :func:`select_stats`; functions marked
    ``row_independent`` get all windows of a batch in one call when they score the same positions
    (the same values as per window, fewer launches). ``noise_windows`` (window indices) limits the
    ``fp@noise`` pair to those windows (None: every window); ``reference32`` runs on them only.
    ``timer`` gets each variant's forwards (``forward <name>``, ``forward fp32 reference``) and the
    statistics (``statistics``) as phases."""
    timer = timer or PhaseTimer("cpu")
    names = list(variants)
    noise_set = None if noise_windows is None else {int(w) for w in noise_windows}
    if not names or names[0] != "fp":
        raise ValueError("variants must start with 'fp'")
    mine = shard(list(range(len(windows))), rank, world_size)
    batches = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
    per_window: list[tuple[int, dict[str, Any]]] = []
    for batch in progress(batches):
        idx = [w for _, w in batch]
        x = windows.input_ids[idx].to(device)
        targets = x[:, 1:]
        firsts = [int(windows.first[w]) for w in idx]
        out: list[dict[str, Any]] = [{"nll": {}, "pairs": {}} for _ in idx]

        def by_window(fn: Callable, *logits: torch.Tensor, sel: list[int] | None = None) -> list:
            """fn's outputs for each window b of the batch (or of the batch positions ``sel``, whose
            rows alone ``logits`` hold): one call over the [B, M, V] view of the scored rows when fn
            takes it, else one call per window."""
            sel = list(range(len(idx))) if sel is None else sel
            fs = [firsts[b] for b in sel]
            if getattr(fn, "row_independent", False) and len(set(fs)) == 1:
                f = fs[0]
                got = fn(*(z[:, f - 1: -1] for z in logits), targets[sel, f - 1:])
                if isinstance(got, dict):
                    split = {k: v.view(len(sel), -1).unbind(0) for k, v in got.items()}
                    return [{k: v[i] for k, v in split.items()} for i in range(len(sel))]
                return list(got.view(len(sel), -1).unbind(0))
            return [fn(*(z[i, fs[i] - 1: -1] for z in logits), targets[b, fs[i] - 1:]) for i, b in enumerate(sel)]

        with timer("forward fp"):
            fp_logits = forward_logits(variants["fp"], x)
        sel = [b for b, w in enumerate(idx) if noise_set is None or w in noise_set] if reference32 is not None else []
        if sel:
            whole = len(sel) == len(idx)
            with timer("forward fp32 reference"):
                ref_logits = forward_logits(reference32, x if whole else x[sel])
            fp_sel = fp_logits if whole else fp_logits[sel]
            with timer("statistics"):
                noise_stats = by_window(stats_fn, ref_logits, fp_sel, sel=sel)
            for b, s in zip(sel, noise_stats):
                del s["own_nll_ref"], s["own_nll"]  # fp's own NLL comes from the pass over all windows
                out[b]["pairs"][NOISE] = s
            del ref_logits, fp_sel
        for name in names[1:]:
            with timer(f"forward {name}"):
                q_logits = forward_logits(variants[name], x)
            with timer("statistics"):
                q_stats = by_window(stats_fn, fp_logits, q_logits)
            for b, s in enumerate(q_stats):
                out[b]["nll"][name] = s.pop("own_nll")
                out[b]["nll"].setdefault("fp", s["own_nll_ref"])
                del s["own_nll_ref"]
                out[b]["pairs"][name] = s
            del q_logits
        if "fp" not in out[0]["nll"]:
            with timer("statistics"):
                fp_nll = by_window(nll_fn, fp_logits)
            for b, nll in enumerate(fp_nll):
                out[b]["nll"]["fp"] = nll
        del fp_logits
        per_window += list(zip(idx, out))
    result = PassResult()
    for o in gather(_to_numpy(per_window), world_size):
        for v, arr in o["nll"].items():
            result.nll.setdefault(v, []).append(arr)
        for p, d in o["pairs"].items():
            for k, arr in d.items():
                result.pairs.setdefault(p, {}).setdefault(k, []).append(arr)
    return result


def _to_numpy(per_window: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """Per-window device vectors → float32 numpy arrays, with one device-to-host copy per kind of
    vector (copying per window would synchronise the device hundreds of times)."""
    if not per_window:
        return []
    # the union over windows: the fp@noise pair may hold a subsample of them
    paths = list(dict.fromkeys((group, key, sub) for _, o in per_window for group, d in o.items()
                               for key, v in d.items() for sub in (v if isinstance(v, dict) else [None])))

    def get(o, group, key, sub):
        v = o[group].get(key)
        return v if sub is None or v is None else v.get(sub)

    host: list[tuple[int, dict[str, Any]]] = [(w, {"nll": {}, "pairs": {}}) for w, _ in per_window]
    for group, key, sub in paths:
        have = [(h, get(o, group, key, sub)) for h, (_, o) in zip(host, per_window)]
        have = [(h, v) for h, v in have if v is not None]
        parts = [v for _, v in have]
        flat = torch.cat(parts).float().cpu().numpy()
        pieces = np.split(flat, np.cumsum([len(p) for p in parts])[:-1])
        for ((_, o), _), piece in zip(have, pieces):
            if sub is None:
                o[group][key] = piece
            else:
                o[group].setdefault(key, {})[sub] = piece
    return host


def _finite(parts: list[np.ndarray]) -> np.ndarray:
    """The finite values of per-window arrays, concatenated."""
    a = np.concatenate(parts) if parts else np.zeros(0)
    return a[np.isfinite(a)]


def _sums(per_window: list[np.ndarray], f: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> np.ndarray:
    """Per-window float64 sum of f(values) over the finite tokens."""
    return np.asarray([f(a[np.isfinite(a)].astype(np.float64)).sum() for a in per_window], dtype=np.float64)


def _counts(per_window: list[np.ndarray]) -> np.ndarray:
    return np.asarray([np.isfinite(a).sum() for a in per_window], dtype=np.float64)


def _ratio_ci(num: np.ndarray, den: np.ndarray, seed: int, f: Callable = lambda r: r) -> list[float] | None:
    if den.sum() <= 0:
        return None
    return stats.percentile_ci(f(stats.bootstrap_ratio_of_sums(num, den, seed=seed)))


TAIL_FRACTION = 0.01  # the tail statistic: each window's top 1% of per-token KL


def _top_sums(per_window: list[np.ndarray], fraction: float = TAIL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Per window: sum and count of its largest ceil(fraction x finite tokens) values. A tail with an
    uncertainty (windows resample), where the maximum of all tokens is a fresh heavy-tailed draw each run."""
    sums, counts = [], []
    for a in per_window:
        a = a[np.isfinite(a)].astype(np.float64)
        k = int(math.ceil(fraction * a.size)) if a.size else 0
        sums.append(float(np.partition(a, a.size - k)[a.size - k:].sum()) if k else 0.0)
        counts.append(k)
    return np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)


def _hist(values: np.ndarray, edges: list[float]) -> dict[str, list]:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=np.asarray(edges))
    return {"edges": [float(e) for e in edges], "counts": counts.tolist()}


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {f"p{q:g}".replace(".", "_"): float(v) for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def variant_records(nll: list[np.ndarray], windows: Windows, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records (as ``Results.add`` keyword sets, less stage/task/variant) of one variant, and its
    per-window details."""
    nll_sum, n = _sums(nll), _counts(nll)
    words, nbytes = windows.n_words.astype(np.float64), windows.n_bytes.astype(np.float64)
    total, tokens = float(nll_sum.sum()), int(n.sum())
    nonfinite = int(sum(a.size for a in nll)) - tokens
    ok = tokens > 0
    ln2 = math.log(2)
    recs = [
        dict(metric="token_ppl", value=math.exp(total / tokens) if ok else None, unit="ppl", n=tokens,
             higher_is_better=False, ci95=_ratio_ci(nll_sum, n, seed, np.exp),
             definition="exp(sum NLL / scored tokens)"),
        dict(metric="word_ppl", value=math.exp(total / words.sum()) if ok and words.sum() > 0 else None, unit="ppl", n=int(words.sum()),
             higher_is_better=False, ci95=_ratio_ci(nll_sum, words, seed, np.exp),
             definition="exp(sum NLL / words of the scored text); word = maximal non-whitespace run (lm-eval wikitext)"),
        dict(metric="bits_per_byte", value=total / nbytes.sum() / ln2 if ok and nbytes.sum() > 0 else None, unit="bits/byte",
             n=int(nbytes.sum()), higher_is_better=False, ci95=_ratio_ci(nll_sum / ln2, nbytes, seed),
             definition="sum NLL / (ln 2 x UTF-8 bytes of the scored text)"),
        dict(metric="nll_mean", value=total / tokens if ok else None, unit="nats/token", n=tokens,
             higher_is_better=False, ci95=_ratio_ci(nll_sum, n, seed), definition="sum NLL / scored tokens"),
        dict(metric="nonfinite_tokens", value=float(nonfinite), unit="tokens", n=tokens + nonfinite,
             higher_is_better=False, definition="scored tokens whose logits hold NaN or inf (excluded from every statistic)"),
    ]
    details = {"nll_sum": nll_sum.tolist(), "n_finite": n.astype(int).tolist()}
    return recs, details


def paired_records(pair: dict[str, list[np.ndarray]], seed: int, reference: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records of one pair (reference P vs candidate Q) and its per-window details and histograms."""
    n = _counts(pair["kld"])
    tokens = int(n.sum())
    nonfinite = int(sum(a.size for a in pair["kld"])) - tokens
    kld_sum, dp_sum = _sums(pair["kld"]), _sums(pair["delta_p"])
    dp_sq_sum, same_sum = _sums(pair["delta_p"], np.square), _sums(pair["same_top1"])
    ref_sum, cand_sum = _sums(pair["nll_ref"]), _sums(pair["nll"])
    top_sum, top_n = _top_sums(pair["kld"])
    kld, dp = _finite(pair["kld"]), _finite(pair["delta_p"])
    ok = tokens > 0
    mean = (lambda s: float(s.sum()) / tokens) if ok else (lambda s: None)
    pct = (lambda q: float(np.percentile(kld, q))) if ok else (lambda q: None)
    ln_ratio = (float(cand_sum.sum()) - float(ref_sum.sum())) / tokens if ok else None
    if ok:
        reps = stats.bootstrap_ratio_of_sums(np.stack([ref_sum, cand_sum], axis=1), n, seed=seed)
        ln_reps = reps[:, 1] - reps[:, 0]
        ln_ci, ratio_ci = stats.percentile_ci(ln_reps), stats.percentile_ci(np.exp(ln_reps))
    else:
        ln_ci = ratio_ci = None
    versus = f"P = {reference}, Q = this variant, per scored token"
    extra = {"windows": len(n), "reference": reference}
    recs = [
        dict(metric="kld_mean", value=mean(kld_sum), unit="nats", n=tokens, higher_is_better=False,
             ci95=_ratio_ci(kld_sum, n, seed), definition=f"mean KL(P||Q) = sum_x P ln(P/Q); {versus}",
             extra={**extra, "percentiles": _percentiles(kld)}),
        dict(metric="kld_median", value=pct(50), unit="nats", n=tokens, higher_is_better=False,
             definition=f"median of per-token KL(P||Q); {versus}"),
        dict(metric="kld_p99", value=pct(99), unit="nats", n=tokens, higher_is_better=False,
             definition=f"99th percentile of per-token KL(P||Q); {versus}"),
        dict(metric="kld_p99_9", value=pct(99.9), unit="nats", n=tokens, higher_is_better=False,
             definition=f"99.9th percentile of per-token KL(P||Q); {versus}"),
        dict(metric="kld_max", value=pct(100), unit="nats", n=tokens, higher_is_better=False,
             definition=f"largest per-token KL(P||Q) (an extreme: reported, never gated); {versus}"),
        dict(metric="kld_top1pct_mean", value=float(top_sum.sum() / top_n.sum()) if top_n.sum() > 0 else None,
             unit="nats", n=int(top_n.sum()), higher_is_better=False,
             ci95=_ratio_ci(top_sum, top_n, seed) if top_n.sum() > 0 else None,
             definition=f"mean KL(P||Q) of each window's top {TAIL_FRACTION:.0%} tokens; ci95 by bootstrap over "
                        f"windows; {versus}", extra=dict(extra)),
        dict(metric="delta_p_mean", value=mean(dp_sum), unit="probability", n=tokens, higher_is_better=None,
             ci95=_ratio_ci(dp_sum, n, seed), definition=f"mean of Q(correct) - P(correct); {versus}",
             extra={**extra, "percentiles": _percentiles(dp)}),
        dict(metric="delta_p_rms", value=math.sqrt(mean(dp_sq_sum)) if ok else None, unit="probability", n=tokens,
             higher_is_better=False, ci95=_ratio_ci(dp_sq_sum, n, seed, np.sqrt),
             definition=f"sqrt(mean (Q(correct) - P(correct))^2); {versus}"),
        dict(metric="same_top1", value=mean(same_sum), unit="fraction", n=tokens, higher_is_better=True,
             ci95=_ratio_ci(same_sum, n, seed), definition=f"fraction of tokens with argmax P == argmax Q; {versus}"),
        dict(metric="ppl_ratio", value=math.exp(ln_ratio) if ok else None, unit="ratio", n=tokens,
             higher_is_better=False, ci95=ratio_ci,
             definition=f"token_ppl(Q) / token_ppl(P) on the tokens both score; paired bootstrap over windows; {versus}"),
        dict(metric="ln_ppl_ratio", value=ln_ratio, unit="nats/token", n=tokens, higher_is_better=False, ci95=ln_ci,
             definition=f"mean NLL(Q) - mean NLL(P) = ln(ppl_ratio); {versus}"),
        dict(metric="nonfinite_tokens", value=float(nonfinite), unit="tokens", n=tokens + nonfinite,
             higher_is_better=False, definition=f"tokens where P or Q logits hold NaN or inf (excluded); {versus}"),
    ]
    details = {"reference": reference, "n": n.astype(int).tolist(), "kld_sum": kld_sum.tolist(),
               "delta_p_sum": dp_sum.tolist(), "delta_p_sq_sum": dp_sq_sum.tolist(), "same_top1": same_sum.tolist(),
               "nll_ref_sum": ref_sum.tolist(), "nll_sum": cand_sum.tolist(),
               "kld_top1pct_sum": top_sum.tolist(), "kld_top1pct_n": top_n.astype(int).tolist(),
               "kld_hist": _hist(kld, KLD_HIST_EDGES), "delta_p_hist": _hist(dp, DELTA_P_HIST_EDGES)}
    return recs, details


def trivial_noise_records(n_tokens: int, reason: str) -> list[dict[str, Any]]:
    """fp@noise when the run's dtype is float32 itself: zero by construction, said so, not measured."""
    values = {"kld_mean": 0.0, "kld_top1pct_mean": 0.0, "kld_median": 0.0, "kld_p99": 0.0, "kld_p99_9": 0.0, "kld_max": 0.0,
              "delta_p_mean": 0.0, "delta_p_rms": 0.0, "same_top1": 1.0, "ppl_ratio": 1.0, "ln_ppl_ratio": 0.0}
    units = {"same_top1": "fraction", "ppl_ratio": "ratio", "ln_ppl_ratio": "nats/token",
             "delta_p_mean": "probability", "delta_p_rms": "probability"}
    return [dict(metric=m, value=v, unit=units.get(m, "nats"), n=n_tokens,
                 higher_is_better=True if m == "same_top1" else (None if m == "delta_p_mean" else False),
                 definition=f"noise floor not measured: {reason}", extra={"trivial": True, "reason": reason})
            for m, v in values.items()]



def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--ppl-corpus", default="wikitext2",
                   help="wikitext2 (test split, default), wikitext2-valid, or a .txt/.jsonl file ('text' fields)")
    g.add_argument("--ppl-context", type=int, default=2048, help="window length in tokens (default 2048)")
    g.add_argument("--ppl-stride", type=int,
                   help="corpus tokens between window starts (default: disjoint windows); smaller = overlapping "
                        "windows, each token scored once with up to context-stride tokens of extra context")
    g.add_argument("--ppl-score", choices=["all", "second-half"], default="all",
                   help="score every position of a window (default) or only its second half (llama.cpp)")
    g.add_argument("--ppl-windows", type=int, help="evaluate only the first N windows (marks results partial)")
    g.add_argument("--ppl-batch", type=int,
                   help="windows per forward (default on a GPU: one model's bf16 logits near 4 GiB, at most "
                        f"{GPU_POSITIONS_PER_BATCH} positions, half that without the fused statistics, fewer where free GPU "
                        "memory cannot hold a batch; 1 on a CPU)")
    g.add_argument("--ppl-compile", action="store_true",
                   help="run the per-token statistics under torch.compile (fewer passes over the logits; compiles once)")
    g.add_argument("--ppl-noise-floor", choices=noise_floor.MODES, default="sample",
                   help="compare fp in the run's dtype with fp in float32 (variant fp@noise) on a seeded subsample of "
                        "windows sized for a +-20%% CI (sample, default), on every window (full), or not at all (off)")
    g.add_argument("--no-ppl-noise-floor", dest="ppl_noise_floor", action="store_const", const="off",
                   help=argparse.SUPPRESS)  # the spelling before sample|full|off


def _protocol_from(ctx) -> Protocol:
    context = int(ctx.option("ppl_context", 2048))
    max_seq = ctx.loaded.info.max_seq_len
    if max_seq and context > max_seq:
        raise EvalsuiteError(f"--ppl-context {context} is longer than the model's {max_seq} positions")
    limits = [x for x in (ctx.option("ppl_windows"), ctx.limit) if x is not None]
    if any(x < 1 for x in limits):
        raise EvalsuiteError("--ppl-windows must be at least 1")
    return Protocol(context=context, stride=ctx.option("ppl_stride"), score=ctx.option("ppl_score", "all"),
                    max_windows=min(limits) if limits else None)


def gpu_windows_per_batch(context: int, vocab: int, fused_stats: bool = True, free_bytes: int | None = None,
                          config: Any = None, noise_floor: bool = True) -> int:
    """Default windows per forward on a GPU (see ``GPU_LOGITS_BYTES``), fewer where ``free_bytes``
    of device memory cannot hold a batch's transient tensors: fp's and a candidate's logits in
    16 bits, the float32 reference's logits for the noise floor, the torch statistics' two float32
    log-softmax matrices, and one layer's float32 activations (:mod:`evalsuite.measure.memory`)."""
    from evalsuite.measure import memory

    positions = min(GPU_POSITIONS_PER_BATCH, GPU_LOGITS_BYTES // (2 * max(1, vocab)))
    if not fused_stats:
        positions //= 2
    cap = max(1, positions // context)
    logit_bytes = 2 * 2 + (4 if noise_floor else 0) + (0 if fused_stats else 8)
    per_window = context * (vocab * logit_bytes + memory.activation_bytes_per_token(config))
    return memory.fit(per_window, free_bytes, cap)


def _batch_size(ctx, context: int, fused_stats: bool, noise_reference_bytes: int = 0) -> int:
    b = ctx.option("ppl_batch")
    if b is not None:
        if b < 1:
            raise EvalsuiteError("--ppl-batch must be at least 1")
        return b
    if ctx.device.type != "cuda":
        return 1
    from evalsuite.measure import memory

    config = getattr(ctx.fp, "config", None)
    vocab = getattr(config, "vocab_size", None) or 128_000
    free = memory.free_bytes(ctx.device)
    if free is not None and noise_reference_bytes:  # the float32 model is not on the device yet
        free = max(0, free - noise_reference_bytes)
    return gpu_windows_per_batch(context, int(vocab), fused_stats, free, config, noise_floor=noise_reference_bytes > 0)


def _noise_reference(ctx, mode: str) -> tuple[nn.Module | None, str]:
    """The fp32 model for the noise floor, or None and why there is none (built once per run)."""
    if mode == "off":
        return None, "off (--ppl-noise-floor off)"
    if ctx.dtype == torch.float32:
        return None, "trivial: the run's dtype is float32, the reference precision itself, so fp@noise is zero by construction"
    try:
        if noise_floor.can_upcast(ctx):
            return (noise_floor.upcast_reference(ctx.fp, ctx.device),
                    "measured: fp in the run's dtype vs fp in float32 (the checkpoint's own weights upcast: exact, no reload)")
        if ctx.reload is None:
            return None, "unavailable: this run cannot reload the model in float32"
        return ctx.reload(torch.float32), "measured: fp in the run's dtype vs fp in float32 (reloaded)"
    except (EvalsuiteError, RuntimeError, MemoryError) as e:  # a float32 copy may not fit the device
        return None, f"unavailable: building the float32 model failed ({first_line(e, 200)})"


def run(ctx) -> None:
    from evalsuite.measure.corpus import load_corpus

    protocol = _protocol_from(ctx)
    seconds: dict[str, float] = {}  # where the stage's time goes (wall clock per phase)
    t0 = time.perf_counter()
    text, source, task = load_corpus(ctx.option("ppl_corpus", "wikitext2"), ctx.data_dir)
    tokenizer = ctx.tokenizer
    ids, ends = tokenize_corpus(tokenizer, text)
    rule = bos_rule(tokenizer)
    tokenization.note(ctx.results.run, rule)
    families.note(ctx.results.run, ctx.fp)
    windows = make_windows(ids, text, ends, protocol, rule.bos_id, source, decode=tokenizer.decode)
    stats_fn, nll_fn, stats_name = select_stats(ctx.device, bool(ctx.option("ppl_compile")), ctx.fused_kernels)
    noise_mode = noise_floor.parse_mode(ctx.option("ppl_noise_floor", "sample"))
    if noise_mode not in noise_floor.MODES:
        raise EvalsuiteError(f"--ppl-noise-floor {noise_mode!r}: expected one of {', '.join(noise_floor.MODES)}")
    measured_floor = noise_mode != "off" and ctx.dtype != torch.float32
    fp32_bytes = 4 * sum(p.numel() for p in ctx.fp.parameters()) if measured_floor else 0
    batch_size = _batch_size(ctx, protocol.context, fused_stats=stats_name == "triton-fused",
                             noise_reference_bytes=fp32_bytes)
    seed = int(ctx.option("seed", 0) or 0)
    noise_windows = noise_floor.sample_windows(len(windows), seed) if noise_mode == "sample" else None
    cache = fp_cache.Entry(ctx, "ppl", {
        "corpus_sha256": fp_cache.digest(text), "source": source,
        "window_ids_sha256": hashlib.sha256(windows.input_ids.numpy().tobytes()).hexdigest(),
        "protocol": [protocol.context, protocol.stride, protocol.score, protocol.max_windows],
        "batch_size": batch_size, "stats": stats_name, "compiled_stats": bool(ctx.option("ppl_compile")),
        "noise_floor": noise_mode, "noise_windows": None if noise_windows is None else noise_windows.tolist()})
    cached = cache.load()
    seconds["corpus_and_windows"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    if cached is not None:
        reference32, noise = None, cached["noise_floor"]
    else:
        reference32, noise = _noise_reference(ctx, noise_mode)
    seconds["float32_reference"] = round(time.perf_counter() - t0, 3)
    described = windows.describe()
    details: dict[str, Any] = {
        "task": task, "source": source, "protocol": {
            "description": described, "context": protocol.context, "stride": protocol.stride, "score": protocol.score,
            "bos": windows.bos, "batch_size": batch_size, "compiled_stats": bool(ctx.option("ppl_compile")),
            "stats": stats_name,
            "dtype": str(ctx.dtype).removeprefix("torch."),
            "noise_floor": noise, "noise_floor_mode": noise_mode},
        "windows": {"start": windows.start.tolist(), "n_scored": windows.n_scored.tolist(),
                    "n_words": windows.n_words.tolist(), "n_bytes": windows.n_bytes.tolist()},
        "variants": {}, "paired": {}, "seconds": seconds,
    }
    ctx.results.details["ppl"] = details
    ctx.results.run["partial"] = ctx.results.run.get("partial", False) or protocol.max_windows is not None
    ctx.checkpoint()
    t0 = time.perf_counter()
    timer = PhaseTimer(ctx.device)
    with ctx.fused_forwards(*ctx.variants.values(), reference32) as fused_modules:
        details["protocol"]["fused_modules"] = fused_modules
        result = measure_pass(ctx.variants, windows, ctx.device, batch_size, reference32,
                              progress=lambda it: ctx.progress(it, "ppl", unit="batch"),
                              rank=ctx.rank, world_size=ctx.world_size, stats_fn=stats_fn, nll_fn=nll_fn,
                              noise_windows=noise_windows, timer=timer)
    del reference32
    seconds["paired_pass"] = round(time.perf_counter() - t0, 3)  # every variant's forwards and statistics
    seconds["paired_pass_device"] = timer.totals()  # its device time per forward and for the statistics
    t0 = time.perf_counter()
    if cached is not None:  # fp's own values as the run that stored them measured them
        result.nll["fp"] = [np.asarray(a, dtype=np.float32) for a in cached["fp_nll"]]
        if cached["noise_pair"] is not None:
            result.pairs[NOISE] = {k: [np.asarray(a, dtype=np.float32) for a in v] for k, v in cached["noise_pair"].items()}
    elif ctx.is_writer and not noise.startswith("unavailable"):
        cache.store({"noise_floor": noise, "fp_nll": [a.tolist() for a in result.nll["fp"]],
                     "noise_pair": {k: [a.tolist() for a in v] for k, v in result.pairs[NOISE].items()}
                     if NOISE in result.pairs else None})
    details["protocol"]["fp_cache"] = cache.status
    for variant in ctx.variants:
        recs, det = variant_records(result.nll[variant], windows, seed)
        _add(ctx, task, variant, recs, described)
        details["variants"][variant] = det
        ctx.checkpoint()
    pairs = [(NOISE, "fp in float32")] if NOISE in result.pairs else []
    pairs += [(name, "fp") for name in ctx.quantized]
    for name, reference in pairs:
        recs, det = paired_records(result.pairs[name], seed, reference)
        if name == NOISE:
            recs, det = _noise_sample_records(recs, det, noise_mode, noise_windows, len(windows))
        _add(ctx, task, name, recs, described, paired=True)
        details["paired"][name] = det
        ctx.checkpoint()
    if noise.startswith("trivial"):
        fp_tokens = int(ctx.results.get("ppl", task, "fp", "token_ppl").n)
        _add(ctx, task, NOISE, trivial_noise_records(fp_tokens, noise), described)
    elif noise.startswith("unavailable"):  # asked for and not measured; --no-ppl-noise-floor turns it off
        ctx.results.add_error("ppl", f"noise floor {noise}", variant=NOISE)
    seconds["records"] = round(time.perf_counter() - t0, 3)
    ctx.checkpoint()


def _noise_sample_records(recs: list[dict[str, Any]], det: dict[str, Any], mode: str, sample: np.ndarray | None,
                          n_windows: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """fp@noise records with the windows they cover and, for a subsample, its rule and whether the
    realised 95% CI of kld_mean met the rule's target."""
    windows = list(range(n_windows)) if sample is None else [int(w) for w in sample]
    about: dict[str, Any] = {"mode": mode, "windows": len(windows), "of_windows": n_windows}
    t_ci = None
    if mode == "sample":  # a handful of windows: Student's t, not the bootstrap (see noise_floor)
        kld = next(r for r in recs if r["metric"] == "kld_mean")
        t_ci = stats.ratio_t_interval(det["kld_sum"], det["n"])
        about.update(rule=noise_floor.describe_rule(), **noise_floor.ci_check(kld["value"], t_ci))
    out = []
    for r in recs:
        r = dict(r)
        if mode == "sample":
            r["definition"] += f"; on a seeded subsample of {len(windows)} of {n_windows} windows (--ppl-noise-floor sample)"
            if r["metric"] == "kld_mean":
                r["ci95"] = t_ci
                r["definition"] += "; ci95 by Student's t over the sampled windows"
        r["extra"] = {**r.get("extra", {}), "noise_floor": about}
        out.append(r)
    return out, {**det, "windows": windows, "noise_floor": about}


def _add(ctx, task: str, variant: str, recs: list[dict[str, Any]], protocol: str, paired: bool = False) -> None:
    for r in recs:
        r = dict(r)
        r["definition"] = f"{r['definition']} [{protocol}]"
        r["extra"] = {**r.get("extra", {}), "protocol": protocol}
        ctx.results.add(stage="ppl", task=task, variant=variant, **r)
        if r["metric"] == "nonfinite_tokens" and r["value"]:
            what = "its or the reference's logits" if paired else "logits"
            ctx.results.add_error(
                "ppl", f"{variant}: {int(r['value'])} of {r['n']} scored tokens have NaN/inf {what}; "
                       f"excluded from its statistics", variant=variant)


STAGE = Stage(name="ppl", help="perplexity and KL divergence against fp on a text corpus", run=run,
              add_arguments=add_arguments)
