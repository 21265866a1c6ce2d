"""Robustness, class by class, as a hostile user would try it: a verdict only for what was checked,
no traceback for a user's mistake, nothing lost, no orphaned process.

Built on small real things: a tiny Llama saved with transformers (with a real BPE tokenizer), real
files cut short or poisoned, a real full and a real read-only file system (tmpfs, where this
machine may mount), real signals to real processes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, make_tiny_llama
from evalsuite import stats
from evalsuite.commands.cli import main
from evalsuite.errors import user_error
from evalsuite.judge.checks import EXIT_INCOMPLETE
from evalsuite.results import Results, write_text_atomic

ENV = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "TQDM_DISABLE": "1"}


# ---------------------------------------------------------------------------------------------
# fixtures: a tiny Llama with its own tokenizer, and faulty copies of it

def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A Hugging Face model folder: a 4-layer Llama wide enough that a full wikitext ppl stage
    takes seconds (so a signal can land inside it), with a tokenizer of exactly its vocabulary."""
    d = tmp_path_factory.mktemp("tiny") / "llama"
    tok = _tokenizer()
    make_tiny_llama(vocab_size=len(tok), hidden=256, layers=4).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_tensors(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo PWNED > pwned.txt",))


def _fault(name: str, d: Path) -> None:
    if name == "missing tensor":
        _edit_tensors(d, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    elif name == "unexpected tensor":
        _edit_tensors(d, lambda sd: sd.update({"model.layers.9.extra.weight": torch.zeros(4)}))
    elif name == "mis-shaped tensor":
        _edit_tensors(d, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 256)}))
    elif name == "truncated safetensors":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif name == "config of the wrong types":
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_hidden_layers"] = "four"
        (d / "config.json").write_text(json.dumps(cfg))
    elif name == "malicious pytorch_model.bin":
        (d / "model.safetensors").unlink()
        torch.save({"model.embed_tokens.weight": _Evil()}, d / "pytorch_model.bin")
    elif name == "tokenizer larger than the embedding":
        cfg = json.loads((d / "config.json").read_text())
        _edit_tensors(d, lambda sd: sd.update({"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:200]}))
        cfg["vocab_size"] = 200
        (d / "config.json").write_text(json.dumps(cfg))


FAULTS = {
    "missing tensor": "lacks 1 tensor(s) the model needs (model.layers.1.mlp.up_proj.weight)",
    "unexpected tensor": "holds 1 tensor(s) the model does not use (model.layers.9.extra.weight)",
    "mis-shaped tensor": "model.layers.0.self_attn.q_proj.weight has the wrong shape (checkpoint (8, 256) vs model (256, 256))",
    "truncated safetensors": "not a readable safetensors file",
    "config of the wrong types": "num_hidden_layers",
    "malicious pytorch_model.bin": "refused to unpickle",
    "tokenizer larger than the embedding": "the tokenizer has 290 tokens but the model's embedding has 200 rows",
}


def _one_line_error(capsys, code: int, match: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("evalsuite: error:"), err
    assert match in lines[0], err
    return lines[0]


def _run(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evalsuite", *argv], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=timeout)


def _quick_ppl(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(tiny_dir), "--device", "cpu", "--stages", "ppl", "--ppl-context", "64",
            "--ppl-windows", "4", "--no-ppl-noise-floor", "--no-history", "--no-progress", "--out", str(out), *extra]


# ---------------------------------------------------------------------------------------------
# 1. completeness is part of the verdict

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_run_stopped_by_a_signal_is_incomplete_not_passed(tiny_dir, tmp_path, sig, data_dir, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "evalsuite", "run", "--model", str(tiny_dir), "--device", "cpu",
                             "--stages", "ppl,layers", "--ppl-context", "512", "--no-history", "--no-progress",
                             "--data-dir", str(data_dir), "--out", str(out)],
                            env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait until the ppl stage is running
        try:
            if json.loads((out / "results.json").read_text())["run"].get("running") == "ppl":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be signalled: " + proc.communicate()[1]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 128 + sig), err
    run = Results.load(out / "results.json").run
    assert "ppl" not in run["stage_seconds"] and "ppl" not in run["stages_finished"]
    assert "finished" not in run
    if sig == signal.SIGKILL:
        assert run["running"] == "ppl"
    else:
        assert run["interrupted"] == {"signal": sig.name, "stage": "ppl"}
        assert f"{sig.name} during stage ppl" in err
    results = str(out / "results.json")
    none = str(tmp_path / "no-baselines")  # no baseline found: nothing comparable, INCOMPLETE too
    capsys.readouterr()
    assert main(["gate", "--candidate", results, "--baselines", none, "--no-history"]) == EXIT_INCOMPLETE
    printed = capsys.readouterr().out
    assert "gate INCOMPLETE" in printed and "PASSED" not in printed
    assert "complete/stage/ppl" in printed and "complete/stage/layers" in printed
    assert main(["gate", "--candidate", results, "--baselines", none, "--no-history", "--strict"]) == 1
    assert "gate FAILED" in capsys.readouterr().out


def _synthetic(stages=("ppl", "tasks"), finished=("ppl", "tasks"), tasks=("piqa", "arc_easy"),
               recorded_tasks=("piqa", "arc_easy"), ppl=True, limit=None) -> Results:
    res = Results(run={"started": "t0", "finished": "t1", "schemes": ["int8-wo"], "stages": list(stages),
                       "stages_finished": list(finished), "tasks_requested": list(tasks), "limit": limit,
                       "partial": limit is not None, "model": {"name": "m", "sha256": "a" * 64},
                       "device": {"type": "cpu"}, "dtype": "fp32"})
    if ppl:
        _synthetic_ppl(res, 1e-3)
    res.details["tasks"] = {}
    for t in recorded_tasks:
        right = np.arange(1000) < 600
        res.details["tasks"][t] = {"values": {v: {"acc": right.astype(float).tolist()} for v in ("fp", "int8-wo")}}
        for v in ("fp", "int8-wo"):
            acc, se = stats.mean_stderr(right)
            res.add(stage="tasks", task=t, variant=v, metric="acc", value=acc, unit="fraction", n=1000,
                    higher_is_better=True, stderr=se)
        res.add(stage="tasks", task=t, variant="int8-wo", metric="delta_acc", value=0.0, unit="fraction", n=1000,
                higher_is_better=True, ci95=stats.paired_proportion_diff_ci(right, right))
    return res


def _synthetic_ppl(res: Results, kld: float) -> None:
    """ppl records of int8-wo (mean KLD ``kld``) and the per-window sums they are computed from, as the stage
    writes them (judge.evidence re-derives the records from them)."""
    rng = np.random.default_rng(0)
    n = np.full(40, 100.0)
    kld_sum = kld * n * rng.uniform(0.8, 1.2, 40)
    nll_ref = 3.0 * n * rng.uniform(0.9, 1.1, 40)
    nll = nll_ref + kld_sum
    res.details["ppl"] = {"task": "wikitext2", "variants": {}, "paired": {"int8-wo": {
        "n": n.astype(int).tolist(), "kld_sum": kld_sum.tolist(), "nll_ref_sum": nll_ref.tolist(), "nll_sum": nll.tolist()}}}
    reps = stats.bootstrap_ratio_of_sums(np.stack([nll_ref, nll], axis=1), n, seed=0)
    common = dict(stage="ppl", task="wikitext2", variant="int8-wo", n=4000, higher_is_better=False)
    res.add(**common, metric="kld_mean", value=float(kld_sum.sum()) / 4000, unit="nats",
            ci95=stats.percentile_ci(stats.bootstrap_ratio_of_sums(kld_sum, n, seed=0)))
    res.add(**common, metric="ppl_ratio", value=math.exp((float(nll.sum()) - float(nll_ref.sum())) / 4000), unit="ratio",
            ci95=stats.percentile_ci(np.exp(reps[:, 1] - reps[:, 0])))
    res.add(**common, metric="nonfinite_tokens", value=0.0, unit="tokens")


@pytest.mark.parametrize("candidate,check", [
    (dict(), None),  # complete: PASS, exit 0 (no false alarm)
    (dict(finished=("ppl",)), "complete/stage/tasks"),
    (dict(ppl=False), "complete/stage/ppl"),  # finished without a single record
    (dict(recorded_tasks=("piqa",)), "complete/task/arc_easy"),
    (dict(limit=8), "complete/baseline"),  # different samples: every baseline check SKIPPED
    (dict(stages=()), "complete/stages"),
])
def test_gaps_in_a_run_are_incomplete_and_a_complete_run_passes(tmp_path, capsys, candidate, check):
    base, cand = tmp_path / "base.json", tmp_path / "cand.json"
    _synthetic().save(base)
    _synthetic(**candidate).save(cand)
    code = main(["gate", "--candidate", str(cand), "--baseline", str(base), "--no-history", "--out", str(tmp_path / "g"),
                 "--formats", "json,junit"])
    verdicts = {v["check"]: v["verdict"] for v in Results.load(tmp_path / "g" / "results.json").verdicts}
    if check is None:
        assert code == 0 and verdicts["complete/run"] == "PASS" and "INCOMPLETE" not in verdicts.values()
    else:
        assert code == EXIT_INCOMPLETE and verdicts[check] == "INCOMPLETE", verdicts
        assert 'type="INCOMPLETE"' in (tmp_path / "g" / "junit.xml").read_text()
        assert "gate INCOMPLETE" in capsys.readouterr().out


def test_a_regression_outranks_incompleteness(tmp_path):
    base, cand = tmp_path / "base.json", tmp_path / "cand.json"
    _synthetic().save(base)
    bad = _synthetic(finished=("ppl",))
    _synthetic_ppl(bad, 0.5)
    bad.save(cand)
    assert main(["gate", "--candidate", str(cand), "--baseline", str(base), "--no-history"]) == 1


@pytest.mark.parametrize("stages", ["", ",", " "])
def test_run_with_nothing_to_run_is_a_usage_error(capsys, tmp_path, stages):
    _one_line_error(capsys, main(["run", "--stages", stages, "--out", str(tmp_path / "o")]), "nothing to run")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# 2. loading is verified

@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_checkpoint_is_one_line_exit_2(tiny_dir, tmp_path, capsys, fault, monkeypatch):
    d = _copy(tiny_dir, tmp_path / "model")
    _fault(fault, d)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--model", str(d), "--device", "cpu", "--stages", "none", "--no-history",
                 "--out", str(tmp_path / "out")])
    _one_line_error(capsys, code, FAULTS[fault])
    assert not (tmp_path / "pwned.txt").exists()  # the pickle's code never ran


def test_transformers_load_report_stays_off_stderr(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "model")
    _fault("missing tensor", d)
    p = _run("run", "--model", str(d), "--device", "cpu", "--stages", "none", "--no-progress", "--out", str(tmp_path / "o"))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "LOAD REPORT" not in p.stderr + p.stdout, p.stderr


def test_corrupt_model_cache_is_detected_and_rebuilt(tiny_dir, tmp_path, monkeypatch):
    from evalsuite.load import model as load_model_mod

    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path / "cache"))
    tiny = load_model_mod.load_model(tiny_dir)
    import transformers

    entry = tmp_path / "cache" / f"gguf-{'0' * 16}-tf{transformers.__version__.split('.')[0]}"
    load_model_mod._write_cache(tiny.model, tiny.tokenizer, entry)
    assert load_model_mod._cache_problem(entry) is None
    fake_gguf = tmp_path / "m.gguf"
    fake_gguf.write_bytes(b"GGUF")
    # an intact entry is used as it is: no GGUF conversion
    monkeypatch.setattr(load_model_mod, "_check_gguf", lambda p: (_ for _ in ()).throw(AssertionError("rebuilt")))
    model, _, source = load_model_mod._load_gguf(fake_gguf, "0" * 64, None, cache=True)
    assert source == "gguf cache"
    assert torch.equal(model.model.embed_tokens.weight, tiny.model.model.embed_tokens.weight)
    # a flipped byte: detected by its hash, the entry removed and rebuilt from the GGUF
    with open(entry / "model.safetensors", "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\x7f" * 8)
    assert "model.safetensors does not match its sha256" in load_model_mod._cache_problem(entry)
    with pytest.raises(AssertionError, match="rebuilt"):
        load_model_mod._load_gguf(fake_gguf, "0" * 64, None, cache=True)
    assert not entry.exists()


# ---------------------------------------------------------------------------------------------
# 3. user-caused library errors are one line; every user file is read before the model loads

def _tmpfs(path: Path, *options: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64k", *options)), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    return path


@pytest.fixture
def full_fs(tmp_path):
    fs = _tmpfs(tmp_path / "full")
    yield fs
    subprocess.run(["umount", str(fs)], check=False)


def test_out_that_is_a_file_or_read_only_is_one_line(tiny_dir, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    _one_line_error(capsys, main(_quick_ppl(tiny_dir, f)), "is a file, not a folder")
    ro = _tmpfs(tmp_path / "ro", "ro")
    try:
        _one_line_error(capsys, main(_quick_ppl(tiny_dir, ro / "run")), "Read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_full_disk_is_one_line_and_the_last_checkpoint_stays_whole(tiny_dir, tmp_path, full_fs, capsys, data_dir):
    (full_fs / "run").mkdir()
    (full_fs / "filler").write_bytes(b"\0" * (60 << 10))  # leaves a few KiB: the lock fits, results do not
    code = main(_quick_ppl(tiny_dir, full_fs / "run", "--data-dir", str(data_dir)))
    _one_line_error(capsys, code, "No space left on device")
    assert not [p for p in (full_fs / "run").iterdir() if p.name.endswith(".tmp")]  # no half-written temp left


@pytest.mark.parametrize("gates,match", [
    ("schemes:\n  int8-*: {kld_mean_max: 'tiny'}\n", "kld_mean_max = 'tiny': expected a finite number"),
    ("schemes:\n  int8-*: {kld_mean_max: .nan}\n", "kld_mean_max = nan: expected a finite number"),
    ("schemes:\n  int8-*: {ppl_ratio_max: .inf}\n", "ppl_ratio_max = inf: expected a finite number"),
    ("schemes:\n  int8-*: {kld_mean_maximum: 0.1}\n", "unknown limits kld_mean_maximum"),
    ("baseline: {sigma: -1}\n", "baseline.sigma = -1"),
    ("strict: 'yes'\n", "strict = 'yes'"),
    ("baseline: {rel_floors: {}}\n", "unknown keys rel_floors"),
])
def test_bad_gates_file_fails_before_the_model_loads(tiny_dir, tmp_path, capsys, gates, match):
    g = tmp_path / "gates.yaml"
    g.write_text(gates)
    _one_line_error(capsys, main(_quick_ppl(tiny_dir, tmp_path / "out", "--gates", str(g))), match)
    assert not (tmp_path / "out").exists()  # refused before anything was created or loaded


@pytest.mark.parametrize("extra,match", [
    (["--sigma", "-2"], "--sigma -2.0: must be a positive finite number"),
    (["--sigma", "inf"], "--sigma inf: must be a positive finite number"),
    (["--alpha", "nan"], "--alpha nan: must be between 0 and 1"),
    (["--baseline", "/no/such/baseline.json"], "no such baseline file"),
    (["--stages", "layers", "--layer-thresholds", "/no/such.yaml"], "no such file"),
    (["--resume", "--force"], "contradict"),
])
def test_bad_options_fail_before_the_model_loads(tiny_dir, tmp_path, capsys, extra, match):
    _one_line_error(capsys, main(_quick_ppl(tiny_dir, tmp_path / "out", *extra)), match)
    assert not (tmp_path / "out").exists()


def test_a_baseline_of_another_model_fails_before_the_stages(tiny_dir, tmp_path, capsys):
    base = tmp_path / "other-model.json"
    _synthetic().save(base)  # model "m", another sha256
    _one_line_error(capsys, main(_quick_ppl(tiny_dir, tmp_path / "out", "--baseline", str(base))),
                    "baseline is for model m")
    assert not Results.load(tmp_path / "out" / "results.json").records  # no stage ran


def test_nightly_args_that_do_not_parse_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("entries:\n  - name: a\n    args: \"--limit 'unclosed\"\n")
    _one_line_error(capsys, main(["nightly", "--config", str(cfg), "--out", str(tmp_path / "o")]), "does not parse")


def test_library_errors_a_user_causes_map_to_one_line(tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(OSError) as full:
        with open("/dev/full", "w") as f:
            f.write("x")
            f.flush()
    assert "No space left on device" in str(user_error(full.value))
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(Exception) as st:
        load_file(bad)
    assert "not a readable safetensors file" in str(user_error(st.value, str(bad)))
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError) as up:
        torch.load(evil, weights_only=True)
    assert "refused to unpickle" in str(user_error(up.value))
    assert user_error(ZeroDivisionError()) is None  # a bug stays a bug (exit 3)
    assert user_error(OSError(errno.EIO, "I/O error")) is None


# ---------------------------------------------------------------------------------------------
# 4. no data lost

def test_atomic_write_on_a_full_disk_keeps_the_old_file_whole(full_fs):
    report = full_fs / "report.html"
    write_text_atomic(report, "old report\n")
    with pytest.raises(OSError) as e:
        write_text_atomic(report, "x" * (128 << 10))  # twice the file system
    assert e.value.errno == errno.ENOSPC
    assert report.read_text() == "old report\n"
    assert sorted(p.name for p in full_fs.iterdir()) == ["report.html"]


def test_out_holding_a_run_is_refused_then_forced_or_resumed(tiny_dir, tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    args = _quick_ppl(tiny_dir, out, "--data-dir", str(data_dir))
    assert main(args) in (0, 1)
    first = Results.load(out / "results.json")
    assert first.find(stage="ppl") and (out / "report.html").is_file()
    capsys.readouterr()
    _one_line_error(capsys, main(args), "holds a previous run's results.json; pass --resume")
    assert Results.load(out / "results.json").run["started"] == first.run["started"]  # untouched

    (out / "figures").mkdir(exist_ok=True)
    (out / "figures" / "stale.png").write_bytes(b"old")
    assert main(args + ["--force"]) in (0, 1)
    assert not (out / "figures" / "stale.png").exists()
    forced = Results.load(out / "results.json")

    # resume: the finished ppl stage is kept as it was, the missing layers stage runs
    resumed_args = [a if a != "ppl" else "ppl,layers" for a in args] + ["--resume", "--layer-tokens", "128"]
    assert main(resumed_args) in (0, 1)
    resumed = Results.load(out / "results.json")
    assert resumed.run["stages_finished"] == ["ppl", "layers"] and resumed.run["resumed_from"]["kept_stages"] == ["ppl"]
    assert [m.to_dict() for m in resumed.find(stage="ppl")] == [m.to_dict() for m in forced.find(stage="ppl")]
    assert resumed.find(stage="layers")
    capsys.readouterr()
    _one_line_error(capsys, main(resumed_args[:-3] + ["--resume", "--seed", "7"]), "differs in seed")


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from evalsuite.app.run_dir import OutDirLock
    OutDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_lock_keeps_a_second_process_out_and_a_dead_owners_lock_is_stale(tiny_dir, tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=ENV, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_line_error(capsys, main(_quick_ppl(tiny_dir, out)), "another evalsuite run")
        assert f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".evalsuite.lock").is_file()  # left behind by the killed owner: stale
    assert main(_quick_ppl(tiny_dir, out, "--data-dir", str(data_dir))) in (0, 1)
    assert Results.load(out / "results.json").run["stages_finished"] == ["ppl"]
    assert not (out / ".evalsuite.lock").exists()


# ---------------------------------------------------------------------------------------------
# 5. nightly cleans up: the matrix's real code, each entry a light process that starts a child

ENTRY = textwrap.dedent("""
    import os, subprocess, sys, time
    from evalsuite.commands.nightly import start_entry_watchdog
    start_entry_watchdog()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
    time.sleep(120)
""")

MATRIX = textwrap.dedent("""
    import sys
    from evalsuite.commands import nightly
    from evalsuite.commands.cli import main
    # the entry's real command is an 'evalsuite run' (seconds of imports); a light stand-in here
    nightly.Entry.command = lambda self, out_dir, history: [sys.executable, "-c", sys.argv[1], str(out_dir / "pids")]
    sys.exit(main(["nightly", "--config", sys.argv[2], "--out", sys.argv[3], "--no-history"]))
""")


def _start_matrix(tmp_path: Path, timeout_s: int = 60) -> tuple[subprocess.Popen, list[int], Path]:
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"entries:\n  - name: slow\n    model: x.gguf\n    timeout_s: {timeout_s}\n")
    out = tmp_path / "out"
    matrix = subprocess.Popen([sys.executable, "-c", MATRIX, ENTRY, str(cfg), str(out)], env=ENV, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids_file = out / "entries" / "slow" / "pids"
    deadline = time.time() + 60
    while not (pids_file.is_file() and pids_file.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    return matrix, [int(x) for x in pids_file.read_text().split()], out


def _kill_all(pids: list[int]) -> None:
    """Clean-up after a test: whatever of ``pids`` still runs is killed."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _all_ended(pids: list[int], within: float) -> bool:
    from evalsuite.commands.nightly import _process_alive

    deadline = time.time() + within
    while time.time() < deadline:
        if not any(_process_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signalled_matrix_ends_its_entrys_process_group(tmp_path, sig):
    matrix, pids, out = _start_matrix(tmp_path)
    try:
        matrix.send_signal(sig)
        log, _ = matrix.communicate(timeout=30)
        assert matrix.returncode == 128 + sig, log
        assert _all_ended(pids, 5), f"entry processes {pids} outlived the matrix"
        entry = json.loads((out / "summary.json").read_text())["entries"][0]
        assert entry["status"] == "ERROR" and entry["message"] == f"matrix interrupted by {sig.name}"
    finally:
        _kill_all(pids)
        matrix.kill()


def test_the_entry_of_a_killed_matrix_is_ended_by_its_watchdog(tmp_path):
    matrix, pids, _ = _start_matrix(tmp_path)
    try:
        matrix.kill()  # SIGKILL: the matrix gets no chance to clean up
        matrix.wait()
        assert _all_ended(pids, 5), f"entry processes {pids} were orphaned"
    finally:
        _kill_all(pids)


def test_an_entry_past_its_deadline_is_ended_by_its_watchdog(tmp_path):
    pids_file = tmp_path / "pids"
    env = {**ENV, "EVALSUITE_WATCHDOG": f"{os.getpid()}:{time.time() + 1:.0f}"}
    entry = subprocess.Popen([sys.executable, "-c", ENTRY, str(pids_file)], env=env, cwd=REPO, start_new_session=True,
                             stderr=subprocess.PIPE, text=True)
    try:
        _, err = entry.communicate(timeout=20)
        assert entry.returncode == -signal.SIGTERM and "its timeout_s has passed" in err
        pids = [int(x) for x in pids_file.read_text().split()]
        assert _all_ended(pids, 5)
    finally:
        try:
            os.killpg(entry.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
