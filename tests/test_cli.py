"""The ``evalsuite`` command: help, exit codes, one-line errors, and a no-measurement run's results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evalsuite.commands.cli import COMMANDS, main
from evalsuite.results import REQUIRED_RECORD_KEYS, SCHEMA, Results

REPO = Path(__file__).resolve().parents[1]


def run_cli(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "evalsuite", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_help_lists_every_subcommand():
    p = run_cli("--help")
    assert p.returncode == 0
    for name in COMMANDS:
        assert name in p.stdout


def test_run_help_shows_every_stage_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--quant", "--device", "--dtype", "--data-dir", "--out", "--stages", "--limit"):
        assert opt in out


def _assert_one_line_error(p: subprocess.CompletedProcess, match: str) -> None:
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("evalsuite: error:") and match in lines[0]
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("argv, match", [
    (["run", "--model", "/no/such/model.gguf"], "no such file"),
    (["run", "--quant", "int9-wo"], "unknown quantization scheme 'int9-wo'; known: int8-wo"),
    (["run", "--stages", "ppl,bogus"], "unknown stage 'bogus'"),
    (["run", "--limit", "0"], "--limit must be at least 1"),
    (["run", "--dtype", "fp8"], "invalid choice"),
    (["run", "--data-dir", "/no/such/dir"], "no such directory"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_with_one_line(argv, match):
    _assert_one_line_error(run_cli(*argv), match)


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\x00" * 100)
    _assert_one_line_error(run_cli("run", "--model", str(bad), "--stages", "none"), "not a model file")


def test_truncated_gguf(tmp_path, tiny_gguf):
    cut = tmp_path / "cut.gguf"
    with open(tiny_gguf, "rb") as f:
        cut.write_bytes(f.read(tiny_gguf.stat().st_size // 2))
    env_cache = tmp_path / "cache"
    p = subprocess.run([sys.executable, "-m", "evalsuite", "run", "--model", str(cut), "--stages", "none",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "EVALSUITE_CACHE": str(env_cache)})
    _assert_one_line_error(p, "not a readable GGUF")


def test_run_without_stages_writes_a_valid_results_file(tmp_path, smollm2_path):
    out = tmp_path / "run"
    p = run_cli("run", "--model", str(smollm2_path), "--quant", "int8-wo,int4-wo-g64", "--stages", "none",
                "--out", str(out), "--no-progress")
    assert p.returncode == 0, p.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == SCHEMA
    run = data["run"]
    assert run["schemes"] == ["int8-wo", "int4-wo-g64"]
    assert run["model"]["sha256"] and len(run["model"]["sha256"]) == 64
    assert run["model"]["format"] == "gguf"
    assert run["dtype"] == "fp32" and run["device"]["type"] == "cpu"
    assert run["versions"]["torch"] and run["versions"]["evalsuite"]
    assert {"load", "quantize"} <= set(run["stage_seconds"])
    assert run["started"] <= run["finished"]
    # every linear layer but the head (tied to the embeddings) is quantized
    assert run["quantized_layers"] == {"int8-wo": 210, "int4-wo-g64": 210}
    for r in data["records"]:
        assert set(REQUIRED_RECORD_KEYS) <= set(r)
    Results.load(out / "results.json")  # reads back through the schema check


def test_unknown_task_fails_before_the_model_loads(tmp_path, data_dir):
    p = run_cli("run", "--stages", "tasks", "--tasks", "arc_easyy", "--data-dir", str(data_dir),
                "--out", str(tmp_path / "out"))
    _assert_one_line_error(p, "unknown task 'arc_easyy'")
    assert not (tmp_path / "out").exists()  # rejected before anything was loaded or written


def test_model_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALSUITE_MODEL", str(tmp_path / "missing.gguf"))
    _assert_one_line_error(run_cli("run", "--stages", "none"), f"{tmp_path / 'missing.gguf'}: no such file")


def test_bad_task_limit_fails_before_the_model_loads(tmp_path):
    p = run_cli("run", "--stages", "tasks", "--task-limit", "0", "--out", str(tmp_path / "out"))
    _assert_one_line_error(p, "--task-limit must be at least 1")
    assert not (tmp_path / "out").exists()
