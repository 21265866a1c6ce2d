"""Shared statistics: intervals checked by simulation and against scipy, not against fixed numbers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from evalsuite import stats


def _paired(rng, n, p_a, p_b, rho_both):
    """Correct/incorrect for two models on n items: both right with prob rho_both, and the rest
    split so the marginal accuracies are p_a and p_b."""
    probs = np.array([rho_both, p_a - rho_both, p_b - rho_both, 1 - p_a - p_b + rho_both])
    cells = rng.choice(4, size=n, p=probs)
    return np.isin(cells, (0, 1)), np.isin(cells, (0, 2))


@pytest.mark.parametrize("n, p_a, p_b, both", [(200, 0.6, 0.55, 0.5), (60, 0.8, 0.8, 0.75), (500, 0.4, 0.42, 0.38)])
def test_paired_difference_interval_covers_at_its_level(n, p_a, p_b, both):
    rng = np.random.default_rng(n)
    truth, hits, trials = p_b - p_a, 0, 600
    for _ in range(trials):
        a, b = _paired(rng, n, p_a, p_b, both)
        lo, hi = stats.paired_proportion_diff_ci(a, b)
        hits += lo <= truth <= hi
    # 95% nominal; Newcombe's interval is known to be near-nominal to slightly conservative
    assert 0.925 <= hits / trials <= 0.99


def test_paired_difference_interval_is_wide_when_the_sample_is_tiny():
    a = b = np.array([True, True])  # no item flips: a bootstrap interval would be [0, 0]
    assert stats.paired_bootstrap_mean_diff(a.astype(float), b.astype(float), n_boot=200) == [0.0, 0.0]
    lo, hi = stats.paired_proportion_diff_ci(a, b)
    assert lo < -0.3 and hi >= 0.0


@pytest.mark.parametrize("correct", [[1, 1, 0, 0], [1, 0, 1, 0, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
def test_paired_difference_interval_never_collapses_on_agreeing_items(correct):
    """Both variants right on the same items, accuracy near one half: uncorrected phi is 1 and the
    interval would be [0, 0] (seen on a 4-item run); Newcombe's corrected phi keeps it honest."""
    a = np.array(correct, dtype=bool)
    lo, hi = stats.paired_proportion_diff_ci(a, a.copy())
    assert lo < -0.1 and hi > 0.1 and lo == pytest.approx(-hi)


def test_paired_difference_interval_narrows_with_agreement():
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.6
    identical = stats.paired_proportion_diff_ci(a, a)
    independent = stats.paired_proportion_diff_ci(a, rng.random(400) < 0.6)
    assert identical[1] - identical[0] < (independent[1] - independent[0]) / 3


def test_wilson_matches_scipy():
    for k, n in ((0, 10), (7, 20), (99, 100)):
        lo, hi = stats.wilson_interval(k, n)
        ref = sps.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_mcnemar_matches_scipy_binomial():
    a = np.array([1, 1, 1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    b = np.array([0, 0, 0, 1, 1, 1, 0, 1, 0, 0], dtype=bool)
    p, r2w, w2r = stats.mcnemar_exact(a, b)
    assert (r2w, w2r) == (4, 1)
    assert p == pytest.approx(sps.binomtest(1, 5, 0.5).pvalue)


@pytest.mark.parametrize("continuous", [False, True], ids=["accuracies", "log_likelihoods"])
def test_paired_bootstrap_matches_resampling_items(continuous):
    """Paired 0/1 data is resampled by counts of each difference (a multinomial draw), continuous data
    by items: both give the interval that resampling items directly gives, within Monte Carlo error."""
    rng = np.random.default_rng(3)
    a, b = _paired(rng, 300, 0.55, 0.5, 0.45)
    a, b = a.astype(float), b.astype(float)
    if continuous:
        a, b = a + rng.normal(size=a.size), b + rng.normal(size=b.size)
    d = b - a
    idx = np.random.default_rng(9).integers(0, d.size, size=(20000, d.size))
    ref = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    got = stats.paired_bootstrap_mean_diff(a, b, n_boot=20000, seed=1)
    spread = d.std() / np.sqrt(d.size)  # the interval is ~4 of these wide
    assert got == pytest.approx(list(ref), abs=0.1 * spread)  # Monte Carlo error ~0.03 spread
    assert got[0] < d.mean() < got[1]


def test_ratio_t_interval_covers_at_its_level_over_few_clusters_where_the_bootstrap_does_not():
    """Four windows of a ratio of sums (the sampled noise floor): the t interval covers the true ratio
    in ~95% of draws; the percentile bootstrap over the same four covers clearly less."""
    rng = np.random.default_rng(0)
    true_r, draws, t_hits, boot_hits = 0.002, 400, 0, 0
    for k in range(draws):
        den = rng.integers(1900, 2048, size=4).astype(float)
        num = den * true_r * rng.lognormal(0, 0.15, size=4) / np.exp(0.15 ** 2 / 2)
        lo, hi = stats.ratio_t_interval(num, den)
        t_hits += lo <= true_r <= hi
        blo, bhi = stats.percentile_ci(stats.bootstrap_ratio_of_sums(num, den, n_boot=400, seed=k))
        boot_hits += blo <= true_r <= bhi
    assert 0.91 <= t_hits / draws <= 0.99
    assert boot_hits / draws < t_hits / draws - 0.08
    assert stats.ratio_t_interval([1.0], [2.0]) is None and stats.ratio_t_interval([1.0, 2.0], [0.0, 0.0]) is None
