"""benchmarks/calibrate_limits.py: int8's rule, applied to made-up measurements, gives int8-wo its own
limits back and scales the others by int8-wo's headroom; an interval reaching the proposal is flagged."""

from __future__ import annotations

import sys

import pytest

from evalsuite.results import Results
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import calibrate_limits  # noqa: E402


META = {"unit": "", "n": 1000, "higher_is_better": None}


def made_up_run(fp8_kld=(0.02, 0.018, 0.022), fp8_ratio=(1.012, 1.010, 1.014)) -> Results:
    r = Results()
    for variant, (kld, lo, hi), (ratio, rlo, rhi), sqnr in (
            ("int8-wo", (0.004, 0.0038, 0.0042), (1.003, 1.0025, 1.0035), (38.7, 33.5, 29.7)),
            ("fp8-wo", fp8_kld, fp8_ratio, (31.2, 27.9, 21.3))):
        r.add(stage="ppl", task="wikitext2", variant=variant, metric="kld_mean", value=kld, ci95=[lo, hi], **META)
        r.add(stage="ppl", task="wikitext2", variant=variant, metric="ppl_ratio", value=ratio, ci95=[rlo, rhi], **META)
        for metric, value in zip(calibrate_limits.VIEWS.values(), sqnr):
            r.add(stage="layers", task="all", variant=variant, metric=metric, value=value,
                  extra={"worst": "model.layers.3.mlp.down_proj"}, **META)
    r.add(stage="ppl", task="wikitext2", variant="fp@noise", metric="kld_mean", value=0.001, ci95=[0.0009, 0.0011], **META)
    return r


def test_int8_gets_its_own_limits_back_and_fp8_int8s_headroom():
    cal = calibrate_limits.calibrate(made_up_run())
    assert cal["headroom_kld"] == pytest.approx(0.01 / 0.004)
    int8, fp8 = cal["variants"]["int8-wo"], cal["variants"]["fp8-wo"]
    assert int8["proposed"]["kld_mean_max"] == pytest.approx(0.01)
    assert int8["proposed"]["ppl_ratio_max"] == pytest.approx(1.01)
    assert [int8["proposed"][f"{v}_sqnr_db"] for v in calibrate_limits.VIEWS] == [33, 28, 24]  # the floors in force
    assert fp8["proposed"]["kld_mean_max"] == pytest.approx(0.05)      # 0.02 x 2.5
    assert fp8["proposed"]["ppl_ratio_max"] == pytest.approx(1.04)     # 1 + 0.012 x 0.01 / 0.003
    assert [fp8["proposed"][f"{v}_sqnr_db"] for v in calibrate_limits.VIEWS] == [26, 22, 16]
    assert fp8["limits"]["kld_mean_max"] == {"value": 0.037, "side": "passes"}  # the limit in force
    assert not fp8["flags"]
    assert "| fp8-wo | 0.02 [0.018, 0.022] |" in calibrate_limits.table(cal)


def test_a_proposal_inside_the_variants_interval_is_flagged():
    wide = calibrate_limits.calibrate(made_up_run(fp8_kld=(0.02, 0.01, 0.06)))["variants"]["fp8-wo"]
    assert wide["limits"]["kld_mean_max"]["side"] == "straddles"
    assert any("kld_mean_max 0.05 is inside kld_mean's CI" in f for f in wide["flags"])


@pytest.mark.parametrize("x, up", [(0.0123, 0.013), (0.05, 0.05), (1.0001, 1.1), (2.5e-4, 2.5e-4)])
def test_round_up_to_two_significant_digits(x, up):
    assert calibrate_limits.round_up(x) == pytest.approx(up)
