"""Evaluation data: the embedded smoke suite, `evalsuite data fetch` (with a fake Hub) and `data check`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evalsuite.data import MIRRORED_FILES, MIRRORED_TASKS, SMOKE_DIR, task_sources
from evalsuite.data import mirror

REPO = Path(__file__).resolve().parent.parent

# one row per Hub dataset, in the Hub's own schema
HUB_ROWS = {
    "allenai/ai2_arc": {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock", "wood"],
                                                                    "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    "aps/super_glue:boolq": {"passage": "Water boils at 100 C.", "question": "does water boil at 100 c", "label": 1},
    "aps/super_glue:copa": {"premise": "The man fell.", "question": "cause", "choice1": "He slipped.",
                            "choice2": "He ate.", "label": 0},
    "EleutherAI/lambada_openai": {"text": "she opened the door and saw her friend"},
    "allenai/openbookqa": {"question_stem": "The sun is a", "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
                           "answerKey": "A"},
    "baber/piqa": {"goal": "open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0},
    "allenai/winogrande": {"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
                           "option2": "the table", "answer": "2"},
    "openai/gsm8k": {"question": "Tom has 2 apples and buys 3 more. How many apples does he have?",
                     "answer": "He has 2 + 3 = <<2+3=5>>5 apples.\n#### 5"},
}
WIKI = " = Title = \n \n Some text . \n = Other = \n More text . \n"


def fake_hub(calls):
    def load(path, name, split):
        calls.append((path, name, split))
        if path == "wikitext":
            return [{"text": line} for line in WIKI.splitlines(keepends=True)]
        row = HUB_ROWS.get(f"{path}:{name}", HUB_ROWS.get(path))
        return [row, row, row]
    return load


def test_smoke_suite_is_small_complete_and_licensed():
    files = [p for p in SMOKE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    notice = (SMOKE_DIR / "NOTICE").read_text()
    for rel in MIRRORED_FILES.values():  # GSM8K's few-shot (train) file included
        assert (SMOKE_DIR / rel).is_file() and Path(rel).name in notice
    assert len(MIRRORED_TASKS) == 9 and len(MIRRORED_FILES) == 10
    checks = mirror.check(SMOKE_DIR)
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    assert {c.rows for c in checks if c.format not in ("documents", "generation")} == {100}
    assert {c.task: c.rows for c in checks if c.format == "generation"} == {"gsm8k": 20, "gsm8k-train": 20}


def test_fetch_writes_the_layout_that_check_and_the_tasks_read(tmp_path):
    calls = []
    written = mirror.fetch(tmp_path, loader=fake_hub(calls), echo=lambda _: None)
    assert sorted(str(p.relative_to(tmp_path)) for p in written) == sorted(
        ["wikitext-2/test.txt", "wikitext-2/valid.txt", *MIRRORED_FILES.values()])
    assert ("wikitext", "wikitext-2-v1", "validation") in calls
    assert {("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")} <= set(calls)
    gsm8k = json.loads((tmp_path / "generative" / "gsm8k_train.jsonl").read_text().splitlines()[0])
    assert gsm8k == HUB_ROWS["openai/gsm8k"]
    assert (tmp_path / "wikitext-2" / "test.txt").read_text() == WIKI
    winogrande = json.loads((tmp_path / "downstream" / "winogrande.jsonl").read_text().splitlines()[0])
    assert winogrande == {"context_options": ["The cup fell off the table because the cup",
                                              "The cup fell off the table because the table"],
                          "continuation": "was wobbly.", "gold": 1}
    checks = mirror.check(tmp_path)
    assert all(c.ok for c in checks) and {c.rows for c in checks if c.format != "documents"} == {3}
    assert not list(tmp_path.rglob("*.part"))


def test_fetch_refuses_a_hub_row_it_cannot_convert(tmp_path):
    def broken(path, name, split):
        if path == "baber/piqa":
            return [{"goal": "g", "sol1": "a", "sol2": "b", "label": 5}]
        return fake_hub([])(path, name, split)

    from evalsuite.errors import EvalsuiteError

    with pytest.raises(EvalsuiteError, match="piqa: baber/piqa row 0: gold label 5 is out of range"):
        mirror.fetch(tmp_path, loader=broken, echo=lambda _: None)


def _copy_mirror(dst: Path) -> Path:
    shutil.copytree(SMOKE_DIR, dst)
    return dst


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "evalsuite", *argv], capture_output=True, text=True, cwd=REPO)


def test_check_cli_on_a_good_mirror(tmp_path):
    d = _copy_mirror(tmp_path / "m")
    p = run_cli("data", "check", str(d))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == len(mirror.check(d)) + 1 and all(ln.startswith("ok ") for ln in lines[:-1])
    assert lines[-1] == f"mirror {d}: 12 of 12 files ok"


def test_check_cli_names_each_broken_file(tmp_path):
    d = _copy_mirror(tmp_path / "m")
    (d / "downstream" / "copa.jsonl").unlink()
    with open(d / "downstream" / "piqa.jsonl", "a") as f:
        f.write('{"query": "q", "choices": ["a", "b"], "gold": 7}\n')
    (d / "downstream" / "boolq.jsonl").write_text("not json\n")
    (d / "wikitext-2" / "valid.txt").write_text("no headings here\n")
    p = run_cli("data", "check", str(d))
    assert p.returncode == 1
    bad = {ln.split()[1]: ln for ln in p.stdout.splitlines() if ln.startswith("BAD")}
    assert set(bad) == {"copa", "piqa", "boolq", "wikitext-2-valid"}
    assert "missing" in bad["copa"]
    assert "piqa.jsonl:101: gold label 7 is out of range" in bad["piqa"]
    assert "boolq.jsonl:1: not a JSON object" in bad["boolq"]
    last = p.stdout.strip().splitlines()[-1]
    assert last.endswith(f"8 of 12 files ok; fix or re-fetch: evalsuite data fetch {d}")


def test_check_cli_on_a_missing_folder_is_a_usage_error(tmp_path):
    p = run_cli("data", "check", str(tmp_path / "nope"))
    assert p.returncode == 2 and p.stderr.strip().endswith("no such directory")


def test_task_sources_come_from_the_yamls():
    by_task = {s.task: s for s in task_sources()}
    assert by_task["arc_easy"].hub["path"] == "allenai/ai2_arc" and by_task["wikitext"].format == "documents"
    assert "hellaswag" not in by_task  # Hub only, no mirror file


@pytest.mark.slow
def test_a_non_editable_install_ships_the_smoke_suite_and_the_tasks(tmp_path):
    """Build the wheel from a copy of the sources (no build files left in the checkout), install it
    into a folder, and use it from elsewhere: the smoke suite checks clean, the tasks are found."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("evalsuite", "tasks"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr
    (whl,) = (tmp_path / "dist").glob("evalsuite-*.whl")
    site = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(whl)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    # tasks/ is package data of evalsuite, not a top-level module that another distribution's `tasks` could shadow
    assert not (site / "tasks").exists() and not (site / "tasks.py").exists()
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", "bin"))) == ["evalsuite"]
    code = ("import importlib.util; from evalsuite.data import SMOKE_DIR, mirror; from evalsuite.measure.tasks import TASKS_DIR; "
            "spec = importlib.util.spec_from_file_location('m', TASKS_DIR / 'mirror.py'); m = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m); rows = m.load('multiple_choice', 'downstream/arc_easy.jsonl', data_dir=str(SMOKE_DIR)); "
            "print(SMOKE_DIR, all(c.ok for c in mirror.check(SMOKE_DIR)), len(list(TASKS_DIR.glob('*.yaml'))), TASKS_DIR, "
            "len(rows['test']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(site)})
    assert p.returncode == 0, p.stderr
    smoke, ok, n_yaml, tasks_dir, n_rows = p.stdout.split()
    assert Path(smoke) == site / "evalsuite" / "data" / "smoke" and ok == "True"
    assert int(n_yaml) == len(list((REPO / "tasks").glob("*.yaml")))
    assert Path(tasks_dir) == site / "evalsuite" / "_tasks" and int(n_rows) > 0


def test_every_package_is_in_the_wheel():
    """pyproject lists the packages explicitly (tasks/ is mapped to evalsuite._tasks): a new
    evalsuite/ subpackage missing from the list would be missing from every non-editable install."""
    import tomllib

    from setuptools import find_packages

    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(find_packages(str(REPO), include=["evalsuite*"]) + ["evalsuite._tasks"])


def test_the_mirror_is_one_module():
    """The task YAMLs' ``!function mirror.load`` is evalsuite.data.mirror's load (the same reader and Hub
    converters that `evalsuite data fetch/check` use), reached through the tiny tasks/mirror.py."""
    import importlib.util

    from evalsuite.data import TASKS_DIR

    spec = importlib.util.spec_from_file_location("tasks_mirror_by_path", TASKS_DIR / "mirror.py")
    by_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(by_path)
    assert by_path.load is mirror.load and by_path.DataError is mirror.DataError
    rows = by_path.load("multiple_choice", "downstream/arc_easy.jsonl", data_dir=str(SMOKE_DIR))["test"]
    assert len(rows) == len(mirror.read_mirror(SMOKE_DIR / "downstream" / "arc_easy.jsonl", "multiple_choice"))


@pytest.mark.slow
def test_smoke_run_is_chosen_by_name_marked_and_says_where_the_real_data_is(tmp_path, capsys, smollm2_path):
    from evalsuite.commands.cli import main
    from evalsuite.results import Results

    out = tmp_path / "run"
    code = main(["run", "--suite", "smoke", "--stages", "none", "--model", str(smollm2_path), "--out", str(out),
                 "--data-dir", str(tmp_path), "--no-history"])
    captured = capsys.readouterr()
    assert code == 0
    res = Results.load(out / "results.json")
    assert res.run["suite"] == "smoke" and res.partial and res.run["data_dir"] == str(SMOKE_DIR)
    assert res.run["limit"] == 5
    assert "evalsuite data fetch DIR" in captured.err and "not comparable" in captured.err
    words = " ".join(captured.out.split())  # reasons wrap at the terminal's width
    assert "SMOKE SUITE" in words and "not comparable with" in words
    # the skipped baseline comparison is collapsed in the terminal and kept, with its reason, in the file
    assert any(v["verdict"] == "SKIPPED" and "a --suite smoke run is not compared with baselines" in v["reason"]
               for v in res.verdicts)
    # --stages none: the gate summary (nothing measured, so INCOMPLETE, nothing failed), then the note
    # that says so; the run itself succeeds (code 0 above)
    lines = captured.out.strip().splitlines()
    note, start = lines[-1], max(i for i, ln in enumerate(lines) if ln.startswith("gate "))
    summary = " ".join(ln.strip() for ln in lines[start:-1])  # the summary wraps at the terminal's width
    assert summary.startswith("gate INCOMPLETE") and "FAIL" not in summary
    assert note.startswith("--stages none: loaded and quantized only")
