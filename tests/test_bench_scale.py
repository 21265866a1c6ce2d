"""benchmarks/bench_scale.py --quick: the scale benchmark's tiny shape runs on the CPU end to end."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_scale  # noqa: E402


def test_built_folder_is_the_shape_it_claims(tmp_path, smollm2_path):
    from transformers import AutoModelForCausalLM

    from evalsuite.measure.noise_floor import checkpoint_float_dtypes

    tok = bench_scale.load_tokenizer()
    built = bench_scale.build_folder(tmp_path / "m", "tiny", tok, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == built["n_params"]
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
    assert checkpoint_float_dtypes(tmp_path / "m") == {torch.bfloat16}  # the noise floor needs no reload
    w = model.model.layers[0].mlp.up_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002


def test_quick_run_writes_the_table_and_says_accuracy_is_meaningless(tmp_path, monkeypatch, capsys, data_dir,
                                                                       smollm2_path):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setenv("EVALSUITE_DATA_DIR", str(data_dir))
    assert bench_scale.main(["--quick", "--warm", "--work", str(tmp_path / "work")]) == 0
    report = json.loads((tmp_path / "out" / "scale.json").read_text())
    row, warm = report["runs"]
    assert "MEAN NOTHING" in report["warning"] and "MEAN NOTHING" in capsys.readouterr().out
    assert row["exit"] == "exit 0" and set(row["stage_seconds"]) >= {"load", "ppl", "tasks"}
    assert row["fp_cache"]["ppl"] == "miss, stored" and row["caches"] == "cold"
    # the second pass reruns the whole stage (no fp cache) on the first one's compile caches
    assert warm["caches"] == "warm" and warm["fp_cache"]["ppl"] == "off" and warm["exit"] == "exit 0"
    assert set(row["load_seconds"]) >= {"read", "hash", "to_device"} and "paired_pass_device" in row["ppl_seconds"]
    assert row["model_tflop"]["ppl"] >= 0 and not row["errors"]
    assert not (tmp_path / "work" / "tiny").exists()  # the built model is removed after its run
