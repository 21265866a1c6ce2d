"""The run session: a CPU smoke run gives the records the code gave before the layers were redesigned."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "smoke_run_records.json"
KEYS = ("stage", "task", "variant", "metric", "value", "unit", "n", "higher_is_better", "stderr", "ci95")


@pytest.mark.slow
def test_a_smoke_run_gives_the_records_it_gave_before_the_redesign(tmp_path, smollm2_path):
    """tests/fixtures/smoke_run_records.json was written by the code before #28's moves (commit in
    its ``produced_at``); the same command must give the same records, values and sample sizes
    (timings are not records; floats to 1e-9 relative, the same CPU kernels)."""
    from evalsuite.commands.cli import main
    from evalsuite.results import Results

    ref = json.loads(FIXTURE.read_text())
    argv = shlex.split(ref["command"])[1:] + ["--model", str(smollm2_path), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    got = [{k: r.to_dict().get(k) for k in KEYS} for r in Results.load(tmp_path / "run" / "results.json").records]
    assert [(r["stage"], r["task"], r["variant"], r["metric"]) for r in got] == \
        [(r["stage"], r["task"], r["variant"], r["metric"]) for r in ref["records"]]
    for mine, theirs in zip(got, ref["records"]):
        assert _same(mine, theirs), (mine, theirs)


def _same(a: dict, b: dict) -> bool:
    for k in KEYS:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float):
            if x != pytest.approx(y, rel=1e-9, abs=1e-12, nan_ok=True):
                return False
        elif isinstance(x, list) and isinstance(y, list):
            if x != pytest.approx(y, rel=1e-9, abs=1e-12):
                return False
        elif x != y:
            return False
    return True
