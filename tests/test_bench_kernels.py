"""benchmarks/bench_kernels.py on the CPU (tiny shape, eager): every implementation gets a row, a
config that raises gets its error instead of stopping the script, and the SQNRs are where each
format's bits put them."""

from __future__ import annotations

import json
import math
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_kernels  # noqa: E402


def run(tmp_path, *extra):
    out = tmp_path / "kernels.json"
    assert bench_kernels.main(["--device", "cpu", "--quick", "--no-compile", "--repeat", "2", "--out", str(out),
                               *extra]) == 0
    return json.loads(out.read_text())


def test_every_implementation_has_a_row_with_numbers_or_its_error(tmp_path, capsys):
    report = run(tmp_path)
    rows = {(r["scheme"], r["impl"]): r for r in report["rows"]}
    assert list(rows) == [(s, i) for s, i, _, _ in bench_kernels.implementations()]
    for r in rows.values():
        measured = r["decode_us"] is not None and r["prefill_ms"] is not None and r["sqnr_db"] is not None
        assert measured != bool(r["errors"]), r
    assert rows[("bf16", "torch")]["sqnr_db"] == math.inf
    assert "CUDA" in rows[("int8-wo+gemv", "evalsuite")]["errors"]["build"]  # no GPU here
    sqnr = {k: r["sqnr_db"] for k, r in rows.items() if r["sqnr_db"] is not None}
    assert 38 < sqnr[("int8-wo", "evalsuite")] < 48        # ~8 bits on Gaussian rows
    assert 17 < sqnr[("int4-wo-g128", "evalsuite")] < 24   # ~4 bits
    assert 28 < sqnr[("fp8-wo", "evalsuite")] < 34         # e4m3: 3 mantissa bits
    assert 24 < sqnr[("fp8-dq", "evalsuite")] < sqnr[("fp8-wo", "evalsuite")]  # activations rounded too
    table = capsys.readouterr().out
    assert "| shape | scheme | impl | decode µs | prefill ms | SQNR dB | note |" in table
    assert table.count("| tiny 256->512 |") == len(rows)


def test_a_config_that_raises_is_a_row_not_a_crash(tmp_path, monkeypatch):
    def broken(model, device):
        raise ImportError("Requires mslk >= 1.0.0\nsecond line")

    plain = bench_kernels.implementations()
    monkeypatch.setattr(bench_kernels, "implementations", lambda: [plain[0], ("int4-wo-g128", "torchao", broken, None)])
    rows = run(tmp_path)["rows"]
    assert rows[1]["errors"] == {"build": "ImportError: Requires mslk >= 1.0.0"} and rows[1]["sqnr_db"] is None
    assert rows[0]["sqnr_db"] == math.inf


def test_a_spent_budget_skips_the_remaining_rows(tmp_path):
    rows = run(tmp_path, "--budget-s", "0", "--only", "bf16,fp8-wo")["rows"]
    assert [(r["scheme"], r["impl"]) for r in rows] == [("bf16", "torch"), ("fp8-wo", "evalsuite"), ("fp8-wo", "torchao")]
    assert all("budget" in r["errors"]["skipped"] for r in rows)


def test_unknown_scheme_in_only_is_a_usage_error(capsys):
    assert bench_kernels.main(["--device", "cpu", "--only", "int3-wo"]) == 2
    assert "unknown scheme(s) int3-wo" in capsys.readouterr().err


@pytest.mark.parametrize("value", [None, "1"])
def test_env_is_restored(monkeypatch, value):
    monkeypatch.setenv(bench_kernels.SCALED_MM_ENV, "0")
    with bench_kernels.env(bench_kernels.SCALED_MM_ENV, value):
        assert bench_kernels.os.environ.get(bench_kernels.SCALED_MM_ENV) == value
    assert bench_kernels.os.environ[bench_kernels.SCALED_MM_ENV] == "0"


def test_a_sigterm_during_a_row_keeps_the_rows_measured_with_their_table(tmp_path, monkeypatch, capsys):
    """A step limit's SIGTERM (the 2026-12-08 H100 call lost a whole table to one) ends the rows, not
    the script: the row it interrupts is lost, the rows measured before it are in the JSON, which says
    it was stopped, and in the printed table; each row was on disk as soon as it ended."""
    import os
    import signal

    measure = bench_kernels.measure_row
    out = tmp_path / "kernels.json"
    seen_on_disk = []

    def term_during_the_second(*args, **kwargs):
        if out.exists():
            seen_on_disk.append(len(json.loads(out.read_text())["rows"]))
        row = measure(*args, **kwargs)
        if args[1] == "fp8-wo":  # SIGTERM arrives while the second row is measured
            # without the benchmark's handler the signal would end the test session itself
            assert signal.getsignal(signal.SIGTERM) is bench_kernels._stop
            os.kill(os.getpid(), signal.SIGTERM)
        return row

    monkeypatch.setattr(bench_kernels, "measure_row", term_during_the_second)
    before = signal.getsignal(signal.SIGTERM)
    report = run(tmp_path, "--only", "bf16,fp8-wo,fp8-dq")
    assert [(r["scheme"], r["impl"]) for r in report["rows"]] == [("bf16", "torch")]
    assert report["stopped"] == "stopped by SIGTERM after 1 rows"
    assert seen_on_disk == [1]  # the first row was saved before the second began
    printed = capsys.readouterr().out
    assert "stopped by SIGTERM after 1 rows" in printed and "| tiny 256->512 | bf16 | torch |" in printed
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
