"""Statistics shared by the stages and the judge: numpy and scipy only, no torch.

Conventions: ``stderr`` is one standard error of a mean; ``ci95`` is a two-sided 95% interval as
[low, high]; bootstrap resamples whole clusters (windows, documents, items), never tokens within one,
because tokens of one window are not independent.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special
from scipy import stats as sps

DEFAULT_BOOTSTRAP = 2000
DISCRETE_VALUES = 64  # paired differences with at most this many distinct values are resampled by counts


def mean_stderr(x) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); stderr is nan for n < 2."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def bootstrap_ratio_of_sums(num, den, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of sum(num)/sum(den), resampling clusters (rows) with replacement.

    ``num`` and ``den`` are per-cluster sums (e.g. NLL and token count per window); a paired
    statistic passes several numerators as columns of a 2-D ``num`` and gets one column each.
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    idx = _resampled_rows(np.random.default_rng(seed), len(den), n_boot)
    d = den[idx].sum(axis=1)
    if num.ndim == 1:
        return num[idx].sum(axis=1) / d
    return num[idx].sum(axis=1) / d[:, None]


def ratio_t_interval(num, den, level: float = 0.95) -> list[float] | None:
    """Interval of sum(num)/sum(den) over few clusters: the ratio estimator R with its linearised
    standard error (residuals num_i - R den_i over the mean den, sample std / sqrt(n)) and Student's
    t with n - 1 degrees of freedom. For a handful of clusters, where a percentile bootstrap (few
    distinct resamples) is too narrow. None below two clusters or without a denominator."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    n = num.size
    if n < 2 or den.sum() <= 0:
        return None
    r = num.sum() / den.sum()
    _, se = mean_stderr((num - r * den) / den.mean())
    half = float(sps.t.ppf(0.5 + level / 2, n - 1) * se)
    return [float(r - half), float(r + half)]


def _resampled_rows(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """[n_boot, n] row indices drawn with replacement (32-bit where they fit: ~5x faster to draw
    and to gather with than 64-bit ones)."""
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int32 if n < 2**31 else np.int64)


def percentile_ci(replicates, level: float = 0.95) -> list[float]:
    lo, hi = np.nanpercentile(np.asarray(replicates), [50 * (1 - level), 100 - 50 * (1 - level)], axis=0)
    return [float(lo), float(hi)]


def paired_bootstrap_mean_diff(a, b, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> list[float]:
    """95% interval of mean(b - a) over items scored by both (a: reference, b: candidate)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    values, counts = np.unique(d, return_counts=True)
    if 0 < len(values) <= DISCRETE_VALUES:
        # few distinct differences (-1/0/1 for paired accuracies): drawing n items with replacement
        # draws how many of each value, a multinomial; the same distribution, without n draws each
        return percentile_ci(rng.multinomial(d.size, counts / d.size, size=n_boot) @ values / d.size)
    return percentile_ci(d[_resampled_rows(rng, d.size, n_boot)].mean(axis=1))


def mcnemar_exact(a_correct, b_correct) -> tuple[float, int, int]:
    """Exact (binomial) McNemar test for two classifiers on the same items.

    Returns (two-sided p-value, right→wrong count, wrong→right count), with ``a`` the reference.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    right_to_wrong = int((a & ~b).sum())
    wrong_to_right = int((~a & b).sum())
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0, 0, 0
    p = sps.binomtest(min(right_to_wrong, wrong_to_right), n, 0.5).pvalue
    return float(min(1.0, p)), right_to_wrong, wrong_to_right


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson score interval of a proportion (well behaved near 0 and 1 and for small n)."""
    if n == 0:
        return [math.nan, math.nan]
    z = sps.norm.ppf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(centre - half), float(centre + half)]


def paired_proportion_diff_ci(a_correct, b_correct, level: float = 0.95) -> list[float]:
    """Interval for acc(b) - acc(a) on the same items: Newcombe's (1998) method 10, Wilson score
    intervals of both accuracies combined with the correlation of the pairs (phi with Newcombe's
    correction of its numerator, as in Altman et al., Statistics with Confidence, 2000, p. 52).

    Unlike a percentile bootstrap it stays honest when few items flip: with no discordant pairs the
    bootstrap interval collapses to [0, 0] however small the sample, this one does not.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    n = a.size
    if n == 0:
        return [math.nan, math.nan]
    both, a_only, b_only, neither = (int(x.sum()) for x in (a & b, a & ~b, ~a & b, ~a & ~b))
    pa, pb = a.mean(), b.mean()
    la, ua = wilson_interval(both + a_only, n, level)
    lb, ub = wilson_interval(both + b_only, n, level)
    denom = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    # Newcombe's corrected numerator of phi: AD - BC - N/2 where AD > BC + N/2, 0 where
    # BC <= AD <= BC + N/2, AD - BC below; without it a = b with balanced accuracy gives phi = 1 and an
    # interval of width 0 however few the items (seen: [0, 0] on 4 items)
    ad, bc = both * neither, a_only * b_only
    c = ad - bc - n / 2 if ad > bc + n / 2 else (0.0 if ad >= bc else ad - bc)
    phi = c / math.sqrt(denom) if denom > 0 else 0.0
    lo = (pb - pa) - math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    hi = (pb - pa) + math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return [float(max(-1.0, lo)), float(min(1.0, hi))]


# ---- paired comparisons of two runs on the same windows / items, and family-wise control ----

def paired_ratio_shift(num_base, num_cand, den) -> tuple[float, float, int]:
    """(sum(num_cand) - sum(num_base)) / sum(den) over clusters scored by both runs, with its standard
    error by linearisation over clusters (the ratio estimator's delta method) and the cluster count.

    E.g. per-window NLL sums of a baseline and a candidate run over the same windows' token counts:
    the mean NLL shift in nats/token. Run-to-run noise is what remains; the corpus' own spread cancels.
    """
    b, c, n = (np.asarray(x, dtype=np.float64) for x in (num_base, num_cand, den))
    k = n.size
    if k == 0 or n.sum() <= 0:
        return math.nan, math.nan, k
    d = c - b
    shift = float(d.sum() / n.sum())
    if k < 2:
        return shift, math.nan, k
    resid = d - shift * n
    return shift, float(math.sqrt(k / (k - 1) * (resid ** 2).sum()) / n.sum()), k


def paired_relative_change(num_base, num_cand, den_base=None, den_cand=None) -> tuple[float, float, int]:
    """ratio(cand) / ratio(base) - 1, where ratio = sum(num)/sum(den) over the same clusters (den
    defaults to 1 per cluster), with its delta-method standard error over clusters: e.g. the
    relative change of mean KLD between two runs, window by window."""
    b, c = np.asarray(num_base, dtype=np.float64), np.asarray(num_cand, dtype=np.float64)
    db = np.ones_like(b) if den_base is None else np.asarray(den_base, dtype=np.float64)
    dc = db if den_cand is None else np.asarray(den_cand, dtype=np.float64)
    k = b.size
    if k == 0 or b.sum() <= 0 or db.sum() <= 0 or dc.sum() <= 0:
        return math.nan, math.nan, k
    rb, rc = b.sum() / db.sum(), c.sum() / dc.sum()
    rel = float(rc / rb - 1)
    if k < 2:
        return rel, math.nan, k
    # influence of each cluster on log(rc) - log(rb); se of the log ratio, then to the ratio's scale
    infl = (c - rc * dc) / c.sum() - (b - rb * db) / b.sum()
    se_log = math.sqrt(k / (k - 1) * (infl ** 2).sum())
    return rel, float(se_log * (1 + rel)), k


def paired_flip_shift(base_correct, cand_correct) -> tuple[float, float, int, int, int]:
    """acc(cand) - acc(base) on the same items from the discordant pairs (McNemar's view), its
    standard error and the items, right→wrong and wrong→right counts. The se counts one discordant
    pair more than seen, so that no flips do not make a zero-width interval."""
    a = np.asarray(base_correct, dtype=bool)
    b = np.asarray(cand_correct, dtype=bool)
    n = a.size
    r2w, w2r = int((a & ~b).sum()), int((~a & b).sum())
    if n == 0:
        return math.nan, math.nan, 0, r2w, w2r
    shift = (w2r - r2w) / n
    var = max((r2w + w2r + 1) / n - shift ** 2, 1.0 / n) / n
    return float(shift), float(math.sqrt(var)), n, r2w, w2r


def one_sided_p(excess: float, se: float, df: int | None = None) -> float:
    """P(a statistic ``excess`` standard errors past its null boundary or more | at the boundary):
    Student's t with ``df`` degrees of freedom where given (clusters - 1), else normal."""
    if not math.isfinite(excess):
        return 0.0 if excess > 0 else 1.0
    if not (math.isfinite(se) and se > 0):
        return 0.0 if excess > 0 else 1.0
    z = excess / se
    # the special functions directly: scipy.stats' sf costs ~100 µs a call, and a gate makes hundreds
    return float(special.stdtr(df, -z) if df is not None and df >= 1 else special.ndtr(-z))


def holm_reject(pvalues, alpha: float) -> list[bool]:
    """Holm's step-down rejections at family-wise level ``alpha`` (None p-values are never rejected)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    out = [False] * len(pvalues)
    m = len(order)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (m - rank):
            break
        out[i] = True
    return out


def min_detectable(se: float, alpha: float, power: float = 0.8, df: int | None = None) -> float:
    """The smallest true excess over a check's null boundary that a one-sided level-``alpha`` test
    detects with probability ``power``: (z_{1-alpha} + z_power) x se."""
    if not (math.isfinite(se) and se > 0):
        return math.nan
    q = (lambda p: sps.t.ppf(p, df)) if df is not None and df >= 1 else sps.norm.ppf
    return float((q(1 - alpha) + q(power)) * se)
