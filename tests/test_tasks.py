"""The tasks stage: task loading (local mirror, bad input), paired statistics, a real SmolLM2 run."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from evalsuite.app.config import RunConfig
from evalsuite.errors import EvalsuiteError
from evalsuite.measure import tasks as stage
from evalsuite.results import Results

pytestmark = pytest.mark.filterwarnings("ignore")

MIRRORED = ["arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "boolq", "copa", "openbookqa"]


# ------------------------------------------------------------------------------------ task loading
def test_suites_and_names_resolve(data_dir):
    tm = stage.task_manager(stage.task_dirs(), data_dir)
    assert sorted(stage.resolve_task_names(tm, "standard")) == sorted(MIRRORED)
    assert sorted(stage.resolve_task_names(tm, "quick")) == ["arc_easy", "lambada_openai", "piqa"]
    assert stage.resolve_task_names(tm, "piqa,quick") == ["piqa", "arc_easy", "lambada_openai"]


@pytest.mark.parametrize("name", MIRRORED)
def test_mirrored_tasks_read_the_local_files(name, data_dir):
    """Each task's first requests are built from the first row of its mirror file."""
    tm = stage.task_manager(stage.task_dirs(), data_dir)
    task = stage.load_task(tm, name)
    by_doc = stage.build_requests(task, limit=3)
    assert list(by_doc) == [0, 1, 2]
    mirror = task.config.dataset_kwargs["mirror"]
    with open(data_dir / mirror) as f:
        row = json.loads(f.readline())
    args = [inst.args for inst in by_doc[0]]
    if "choices" in row:
        assert [cont.strip() for _, cont in args] == [c.strip() for c in row["choices"]]
        assert all(row["query"].strip() in ctx for ctx, _ in args)
    elif "context_options" in row:
        assert [ctx for ctx, _ in args] == row["context_options"]
        assert all(cont.strip() == row["continuation"] for _, cont in args)
    else:
        assert args == [(row["context"], " " + row["continuation"])]


def test_unknown_task_lists_the_known_ones(data_dir):
    tm = stage.task_manager(stage.task_dirs(), data_dir)
    with pytest.raises(EvalsuiteError, match=r"unknown task 'arc_eazy'.*arc_easy.*suites: .*quick"):
        stage.resolve_task_names(tm, "arc_eazy")


def test_malformed_yaml_is_named(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("task: broken\ndoc_to_text: [unclosed\n")
    with pytest.raises(EvalsuiteError, match=r"broken\.yaml: malformed task YAML"):
        stage.task_manager(stage.task_dirs([str(tmp_path)]), None)


def _user_task(tmp_path, rows: list, fmt: str = "multiple_choice") -> None:
    """A user's own task in a --tasks-dir, reading a mirror-format file of ``rows``."""
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "mine.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    mirror = (stage.TASKS_DIR / "mirror.py").resolve()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mirror.py").write_text(mirror.read_text())
    (tmp_path / "tasks" / "mine.yaml").write_text(
        "task: my_task\ncustom_dataset: !function mirror.load\n"
        f"dataset_kwargs: {{mirror: mine.jsonl, format: {fmt}}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{query}}'\ndoc_to_target: gold\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n")


def test_user_task_dir_adds_a_task(tmp_path):
    _user_task(tmp_path, [{"query": "Q1", "choices": ["a", "b"], "gold": 1}] * 3)
    tm = stage.task_manager(stage.task_dirs([str(tmp_path / "tasks")]), tmp_path / "data")
    assert "my_task" in stage.resolve_task_names(tm, "my_task")
    assert len(stage.build_requests(stage.load_task(tm, "my_task"), None)) == 3


@pytest.mark.parametrize("bad_row, message", [
    ({"query": "Q", "gold": 0}, r"mine\.jsonl:2: missing field 'choices'"),
    ({"query": "Q", "choices": ["a", "b"], "gold": 2}, r"mine\.jsonl:2: gold label 2 is out of range for 2 options"),
])
def test_bad_data_rows_are_named(tmp_path, bad_row, message):
    _user_task(tmp_path, [{"query": "Q", "choices": ["a", "b"], "gold": 0}, bad_row])
    tm = stage.task_manager(stage.task_dirs([str(tmp_path / "tasks")]), tmp_path / "data")
    with pytest.raises(EvalsuiteError, match=message):
        stage.load_task(tm, "my_task")


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "boolq",
                                  "copa", "openbookqa"])
def test_session_compiles_each_template_once_and_builds_the_same_requests(name, data_dir, monkeypatch):
    """lm_eval_session's template cache and columnar document reading change speed only: the same
    requests of the same documents, the same few-shot pool, one compile per template."""
    from lm_eval import utils

    tm = stage.task_manager(stage.task_dirs(), data_dir)
    plain_task = stage.load_task(tm, name)
    plain = stage.build_requests(plain_task, limit=20)
    compiles = []
    from_string = utils.env.from_string
    monkeypatch.setattr(utils.env, "from_string", lambda t: compiles.append(t) or from_string(t))
    with stage.lm_eval_session():
        task = stage.load_task(tm, name)
        cached = stage.build_requests(task, limit=20)
    assert task.sampler.df == plain_task.sampler.df and len(task.sampler.df) > 20  # the same few-shot pool
    assert len(compiles) == len(set(compiles))
    assert compiles or name == "winogrande"  # winogrande's prompts are functions, not templates
    assert utils.apply_template("{{x}}!", {"x": 1}) == "1!"  # restored, still correct
    assert [[(i.args, i.doc) for i in g] for g in cached.values()] == [[(i.args, i.doc) for i in g] for g in plain.values()]
    assert list(cached) == list(plain)


@pytest.mark.parametrize("source, doc", [
    ("{{question}}\nAnswer:", {"question": "Why?"}),
    ("{{ text.split(' ')[:-1] | join(' ') }}", {"text": "a b c"}),
    ("{% for i in range(n) %}{{ i }}{% endfor %}", {"n": 3}),  # a global (range)
    ("{{ range }}", {"range": "the document's field wins"}),  # a field shadowing a global
    ("{{ choices[gold] | upper }}{% if missing is defined %}!{% endif %}", {"choices": ["x", "y"], "gold": 1}),
])
def test_fast_renderer_renders_as_jinja(source, doc):
    from lm_eval import utils

    template = utils.env.from_string(source)
    assert stage._renderer(template)(doc) == template.render(**doc)


def test_fast_renderer_raises_as_jinja():
    from lm_eval import utils

    template = utils.env.from_string("{{ 1 / zero }}")
    with pytest.raises(ZeroDivisionError):
        stage._renderer(template)({"zero": 0})


# ------------------------------------------------------------------------------------ paired statistics
def _docs(correct):
    return [{"acc": float(c)} for c in correct]


def test_paired_statistics_on_a_hand_computed_case():
    # 10 items: fp right on 0-6; the variant loses items 0, 1, 2 and gains item 9
    fp = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    q = [0, 0, 0, 1, 1, 1, 1, 0, 0, 1]
    recs = {r["metric"]: r for r in stage.paired_records("t", "int8-wo", _docs(fp), _docs(q), {})}
    assert recs["flips_right_to_wrong"]["value"] == 3
    assert recs["flips_wrong_to_right"]["value"] == 1
    assert recs["delta_acc"]["value"] == pytest.approx(0.5 - 0.7)
    # exact McNemar by hand: 4 discordant items, 1 of one kind: p = 2 * (C(4,0) + C(4,1)) / 2^4
    assert recs["mcnemar_p"]["value"] == pytest.approx(2 * (1 + 4) / 16)
    lo, hi = recs["delta_acc"]["ci95"]
    # Newcombe's interval for this table (A=4, B=3, C=1, D=2; corrected phi 0) is about [-0.54, 0.20]
    assert lo <= -0.2 <= hi and -0.6 <= lo <= -0.45 and 0.1 <= hi <= 0.25


def test_paired_test_finds_what_the_unpaired_test_misses():
    """Two models differing on few items, agreeing on the rest: lm-eval's unpaired z-test on the
    two accuracies sees nothing; McNemar and the paired interval see the difference."""
    rng = np.random.default_rng(0)
    n = 1000
    fp = rng.random(n) < 0.6
    q = fp.copy()
    flip = np.flatnonzero(fp)[:30]  # 30 right→wrong, none the other way
    q[flip] = False
    recs = {r["metric"]: r for r in stage.paired_records("t", "v", _docs(fp), _docs(q), {}, seed=1)}
    a, b = fp.mean(), q.mean()
    se = math.sqrt(a * (1 - a) / n + b * (1 - b) / n)
    unpaired_p = 2 * sps.norm.sf(abs(a - b) / se)
    assert unpaired_p > 0.05
    assert recs["mcnemar_p"]["value"] == pytest.approx(sps.binomtest(0, 30, 0.5).pvalue)
    assert recs["mcnemar_p"]["value"] < 1e-6
    assert recs["delta_acc"]["ci95"][1] < 0


def test_variant_records_use_the_mean_and_its_stderr():
    class FakeTask:
        def aggregation(self):
            from lm_eval.api.metrics import mean, perplexity
            return {"acc": mean, "perplexity": perplexity}

        def higher_is_better(self):
            return {"acc": True, "perplexity": False}

    ll = [-1.0, -2.0, -0.5, -3.0]
    docs = [{"acc": a, "perplexity": x} for a, x in zip([1, 0, 1, 1], ll)]
    recs = {r["metric"]: r for r in stage.variant_records(FakeTask(), "t", "fp", docs, {})}
    assert recs["acc"]["value"] == 0.75
    assert recs["acc"]["stderr"] == pytest.approx(sps.sem([1, 0, 1, 1]))
    assert recs["ppl"]["value"] == pytest.approx(math.exp(-np.mean(ll)))
    assert recs["ppl"]["ci95"][0] <= recs["ppl"]["value"] <= recs["ppl"]["ci95"][1]


# ------------------------------------------------------------------------------------ a real run
def _context(smollm2, data_dir, **options):
    from evalsuite.measure.context import RunContext
    from evalsuite.quantize import parse_schemes, quantize_

    (cfg,) = parse_schemes("int8-wo")
    variants = {"fp": smollm2.model, cfg.name: quantize_(copy.deepcopy(smollm2.model), cfg)}
    args = RunConfig.of_options(**{"tasks": None, "suite": None, "tasks_dir": [], "task_limit": None,
                                 "task_batch_size": 16, "task_batch_tokens": None, "lm_adapter": "fast",
                                 "seed": 0, **options})
    return RunContext(loaded=smollm2, variants=variants, configs={cfg.name: cfg}, device=torch.device("cpu"),
                      dtype=torch.float32, config=args, results=Results(run={"schemes": [cfg.name]}),
                      data_dir=data_dir, limit=None, show_progress=False)


def test_smollm2_run_of_two_tasks(smollm2, data_dir):
    ctx = _context(smollm2, data_dir, tasks="copa,arc_easy", task_limit=4)
    saved = []
    ctx.checkpoint = lambda: saved.append(len(ctx.results.records))
    stage.run(ctx)
    res = ctx.results
    assert res.partial and saved and saved == sorted(saved)
    for task in ("copa", "arc_easy"):
        item = res.details["tasks"][task]
        assert item["n"] == 4 and item["doc_ids"] == list(range(4))
        for variant in ("fp", "int8-wo"):
            correct = item["values"][variant]["acc"]
            # per-item correctness = argmax of the recorded per-choice log-likelihoods
            golds = [json.loads(line)["gold"] for line, _ in zip(open(data_dir / "downstream" / f"{task}.jsonl"), range(4))]
            lls = item["loglikelihoods"][variant]
            assert correct == [float(int(np.argmax(l)) == g) for l, g in zip(lls, golds)]
            rec = res.get("tasks", task, variant, "acc")
            assert rec.value == pytest.approx(np.mean(correct)) and rec.n == 4 and rec.extra["partial"]
        fp, q = np.array(item["values"]["fp"]["acc"]), np.array(item["values"]["int8-wo"]["acc"])
        assert res.get("tasks", task, "int8-wo", "flips_right_to_wrong").value == int(((fp == 1) & (q == 0)).sum())
        assert res.get("tasks", task, "int8-wo", "delta_acc").value == pytest.approx(q.mean() - fp.mean())
        assert res.get("tasks", task, "int8-wo", "mcnemar_p") is not None
        # each variant is scored by its own model: no answer is reused across variants
        assert item["loglikelihoods"]["fp"] != item["loglikelihoods"]["int8-wo"]
    assert res.get("tasks", "arc_easy", "fp", "acc_norm") is not None


def test_an_error_while_scoring_surfaces_and_earlier_tasks_stay_recorded(smollm2, data_dir, monkeypatch):
    """Variants are scored in a worker thread while the next ones run: an error there is the
    stage's error, and what was scored before it is in the results."""
    ctx = _context(smollm2, data_dir, tasks="copa,arc_easy,piqa", task_limit=2)
    records = stage.variant_records

    def failing(task, name, *args, **kw):
        if name == "arc_easy":
            raise RuntimeError("scoring failed")
        return records(task, name, *args, **kw)

    monkeypatch.setattr(stage, "variant_records", failing)
    with pytest.raises(RuntimeError, match="scoring failed"):
        stage.run(ctx)
    assert ctx.results.get("tasks", "copa", "int8-wo", "delta_acc") is not None
    assert len(ctx.results.details["tasks"]["copa"]["values"]) == 2
    assert ctx.results.get("tasks", "arc_easy", "fp", "acc") is None


def test_cli_bad_data_exits_2_and_keeps_earlier_tasks(smollm2_path, data_dir, tmp_path, capsys):
    """copa is evaluated, then a user task whose data has an out-of-range label: exit 2 with one line
    naming the file and line, and copa's records are in the saved results."""
    from evalsuite.commands.cli import main

    _user_task(tmp_path, [{"query": "Q", "choices": ["a", "b"], "gold": 0}, {"query": "Q", "choices": ["a"], "gold": 0}])
    (tmp_path / "data" / "downstream").mkdir()
    (tmp_path / "data" / "downstream" / "copa.jsonl").symlink_to(data_dir / "downstream" / "copa.jsonl")
    out = tmp_path / "run"
    code = main(["run", "--model", str(smollm2_path), "--stages", "tasks", "--tasks", "copa,my_task",
                 "--tasks-dir", str(tmp_path / "tasks"), "--limit", "2", "--data-dir", str(tmp_path / "data"),
                 "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "mine.jsonl:2: options should be a list of at least two strings" in err
    saved = Results.load(out / "results.json")
    assert saved.get("tasks", "copa", "fp", "acc") is not None
    assert saved.get("tasks", "copa", "int8-wo", "delta_acc") is not None
    assert any("mine.jsonl:2" in e["message"] for e in saved.errors)
    copa = saved.details["tasks"]["copa"]  # per-item data is saved too
    assert len(copa["values"]["int8-wo"]["acc"]) == len(copa["loglikelihoods"]["fp"]) == 2


def test_host_settings_are_restored_even_after_an_error():
    import gc
    import sys

    interval = sys.getswitchinterval()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with stage._host_tuned():
            assert not gc.isenabled() and sys.getswitchinterval() <= 0.0005
            raise RuntimeError
    assert gc.isenabled() and sys.getswitchinterval() == interval


# ------------------------------------------------------------------------------------ generative tasks
def test_gsm8k_builds_lm_evals_own_prompts_and_scores(data_dir):
    """Our gsm8k.yaml on the mirror equals lm-eval's installed gsm8k task on the same rows: the same
    few-shot prompts (seed 1234), generation arguments and strict/flexible exact match."""
    import functools
    import importlib.util
    from pathlib import Path

    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = importlib.util.spec_from_file_location("evalsuite_mirror", stage.TASKS_DIR / "mirror.py")
    mirror = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mirror)
    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml", resolve_func=True)
    theirs = {k: v for k, v in theirs.items() if k not in ("dataset_path", "dataset_name")}
    theirs["custom_dataset"] = functools.partial(mirror.load, format="generation", mirror="generative/gsm8k_test.jsonl",
                                                 fewshot="generative/gsm8k_train.jsonl", data_dir=str(data_dir))
    with stage.lm_eval_session():
        ref = ConfigurableTask(config=theirs)
        ref.set_fewshot_seed(seed=stage.FEWSHOT_SEED)
        ref_docs = stage.build_requests(ref, 3)
        tm = stage.task_manager(stage.task_dirs(), data_dir)
        ours = stage.load_task(tm, "gsm8k")
        our_docs = stage.build_requests(ours, 3)
        assert [[i.args for i in g] for g in our_docs.values()] == [[i.args for i in g] for g in ref_docs.values()]
        assert our_docs[0][0].args[0].count("Question:") == 6  # five shots and the question
        answers = [" 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18", " So the answer is 3 bolts.", " It is $70,000."]
        ours_scored, ref_scored = stage.score(ours, our_docs, answers), stage.score(ref, ref_docs, answers)
    assert ours_scored == {d: {f"exact_match_{k.replace('-', '_')}": v["exact_match"] for k, v in per.items()}
                           for d, per in _per_filter(ref, ref_docs, answers).items()}
    assert [d["exact_match_strict_match"] for d in ours_scored.values()] == [1.0, 0.0, 0.0]
    assert [d["exact_match_flexible_extract"] for d in ours_scored.values()] == [1.0, 1.0, 1.0]  # 70,000 is item 3's answer
    assert ref_scored == ours_scored


def _per_filter(task, by_doc, answers):
    """lm-eval's own per-filter scoring: process_results on each filter's responses."""
    out = {}
    for doc_id, group in by_doc.items():
        out[doc_id] = {key: task.process_results(group[0].doc, [i.filtered_resps[key] for i in group])
                       for key in group[0].filtered_resps}
    return out


def _generative_user_tasks(tmp_path):
    """A user's generative YAML (its own rows, 0-shot, a stop string) and a short GSM8K (our YAML
    included, one shot, 12 new tokens) in a --tasks-dir."""
    (tmp_path / "data").mkdir()
    rows = [{"question": "What is 2 + 3?", "answer": "#### 5"}, {"question": "What is 10 - 4?", "answer": "#### 6"}]
    with open(tmp_path / "data" / "mine.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mirror.py").write_text((stage.TASKS_DIR / "mirror.py").read_text())
    (tmp_path / "tasks" / "my_gen.yaml").write_text(
        "task: my_gen\ncustom_dataset: !function mirror.load\n"
        "dataset_kwargs: {mirror: mine.jsonl, format: generation}\n"
        "output_type: generate_until\ntest_split: test\n"
        "doc_to_text: 'Question: {{question}}\\nAnswer:'\ndoc_to_target: \"{{answer.split('#### ')[-1]}}\"\n"
        "generation_kwargs: {until: ['\\n'], max_gen_toks: 6, do_sample: true, temperature: 0.5}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n    regexes_to_ignore: [' ']\n")
    (tmp_path / "tasks" / "gsm8k_short.yaml").write_text(
        f"include: {stage.TASKS_DIR / 'gsm8k.yaml'}\ntask: gsm8k_short\ntag: []\nnum_fewshot: 1\n"
        "generation_kwargs: {until: ['Question:', '\\n\\n'], max_gen_toks: 12, do_sample: false}\n")


def test_generative_tasks_record_exact_match_and_paired_statistics(smollm2, data_dir, tmp_path):
    _generative_user_tasks(tmp_path)
    ctx = _context(smollm2, data_dir, tasks="gsm8k_short,my_gen", task_limit=2, tasks_dir=[str(tmp_path / "tasks")])
    # the user's rows live beside their YAML; gsm8k's in the mirror
    ctx.data_dir = data_dir
    (tmp_path / "tasks" / "my_gen.yaml").write_text((tmp_path / "tasks" / "my_gen.yaml").read_text().replace(
        "mirror: mine.jsonl", f"mirror: {tmp_path / 'data' / 'mine.jsonl'}"))
    ctx.checkpoint = lambda: None
    stage.run(ctx)
    res = ctx.results
    for task, metrics in (("gsm8k_short", ["exact_match_strict_match", "exact_match_flexible_extract"]),
                          ("my_gen", ["exact_match"])):
        for metric in metrics:
            for variant in ("fp", "int8-wo"):
                rec = res.get("tasks", task, variant, metric)
                assert rec is not None and rec.n == 2 and rec.unit == "fraction"
                assert rec.value == pytest.approx(np.mean(res.details["tasks"][task]["values"][variant][metric]))
            names = stage.paired_names(metric)
            delta = res.get("tasks", task, "int8-wo", names["delta"])
            fp = np.array(res.details["tasks"][task]["values"]["fp"][metric])
            q = np.array(res.details["tasks"][task]["values"]["int8-wo"][metric])
            assert delta.value == pytest.approx(q.mean() - fp.mean()) and len(delta.ci95) == 2
            assert res.get("tasks", task, "int8-wo", names["mcnemar"]) is not None
            assert res.get("tasks", task, "int8-wo", names["right_to_wrong"]).value == int(((fp == 1) & (q == 0)).sum())
    # each variant's own generated text is what was scored (exact match ignoring spaces, as the YAML says)
    for variant in ("fp", "int8-wo"):
        texts = res.details["tasks"]["my_gen"]["responses"][variant]
        assert all(isinstance(t, str) and t and "\n" not in t for t in texts)
        assert res.details["tasks"]["my_gen"]["values"][variant]["exact_match"] == \
            [float(t.replace(" ", "") == want) for t, want in zip(texts, ["5", "6"])]
    assert "do_sample" in res.get("tasks", "my_gen", "fp", "exact_match").extra["generation"]
    from evalsuite.judge.config import GateConfig, DEFAULTS
    from evalsuite.judge.within import task_checks

    checks = task_checks(res, "int8-wo", GateConfig(copy.deepcopy(DEFAULTS)).scheme("int8-wo")[1], "int8-wo*")
    assert {c.check for c in checks} >= {"tasks/gsm8k_short/int8-wo/delta_exact_match_strict_match",
                                         "tasks/my_gen/int8-wo/delta_exact_match"}


# ------------------------------------------------------------------------------- sound saving
def _saving_checkpoint(ctx, path):
    """The run's real checkpoint: save the results file, read it back (each must be whole)."""
    seen = []

    def checkpoint():
        ctx.results.save(path)
        seen.append(Results.load(path))

    ctx.checkpoint = checkpoint
    return seen


def test_generative_answers_survive_every_checkpoint(smollm2, data_dir, tmp_path):
    """A generated answer has no log-likelihood: GSM8K's first checkpoint used to raise on the NaN
    written for it ('Out of range float values are not JSON compliant'), losing the stage."""
    _generative_user_tasks(tmp_path)
    ctx = _context(smollm2, data_dir, tasks="gsm8k_short", task_limit=2, tasks_dir=[str(tmp_path / "tasks")])
    seen = _saving_checkpoint(ctx, tmp_path / "results.json")
    stage.run(ctx)
    assert len(seen) == 2  # one checkpoint per variant
    for i, saved in enumerate(seen):
        entry = saved.details["tasks"]["gsm8k_short"]
        assert entry["loglikelihoods"] == "not applicable" and not saved.nonfinite
        for variant in ("fp", "int8-wo")[: i + 1]:
            assert len(entry["responses"][variant]) == 2 and all(isinstance(t, str) for t in entry["responses"][variant])
            for metric in ("exact_match_strict_match", "exact_match_flexible_extract"):
                assert len(entry["values"][variant][metric]) == 2
                assert saved.get("tasks", "gsm8k_short", variant, metric) is not None
    assert seen[-1].get("tasks", "gsm8k_short", "int8-wo", "delta_exact_match_strict_match") is not None


@pytest.mark.parametrize("task, metric", [("copa", "acc"), ("my_gen", "exact_match")])
def test_a_nan_per_item_score_is_saved_and_judged_incomplete(smollm2, data_dir, tmp_path, monkeypatch, task, metric):
    """A NaN in one item's score (multiple choice, generative) leaves a valid results file with the
    stage's records, and the task's accuracy is INCOMPLETE naming the cause, never a silent skip."""
    from evalsuite.judge.checks import INCOMPLETE, PASS
    from evalsuite.judge.config import DEFAULTS, GateConfig
    from evalsuite.judge.within import task_checks

    _generative_user_tasks(tmp_path)
    (tmp_path / "tasks" / "my_gen.yaml").write_text((tmp_path / "tasks" / "my_gen.yaml").read_text().replace(
        "mirror: mine.jsonl", f"mirror: {tmp_path / 'data' / 'mine.jsonl'}"))
    ctx = _context(smollm2, data_dir, tasks=task, task_limit=2, tasks_dir=[str(tmp_path / "tasks")])
    seen = _saving_checkpoint(ctx, tmp_path / "results.json")
    real_score, calls = stage.score, []

    def planted(task_obj, by_doc, answers):
        out = real_score(task_obj, by_doc, answers)
        calls.append(1)
        if len(calls) == 2:  # the quantized variant's first item
            out[next(iter(out))][metric] = math.nan
        return out

    monkeypatch.setattr(stage, "score", planted)
    stage.run(ctx)
    saved = seen[-1]
    assert saved.get("tasks", task, "fp", metric) is not None and saved.get("tasks", task, "int8-wo", metric) is not None
    assert saved.details["tasks"][task]["values"]["int8-wo"][metric][0] is None
    assert saved.nonfinite == {f"details/tasks/{task}/values/int8-wo/{metric}": 1}
    checks = task_checks(saved, "int8-wo", GateConfig(copy.deepcopy(DEFAULTS)).scheme("int8-wo")[1], "int8-wo*")
    bad = [c for c in checks if c.check == f"tasks/{task}/int8-wo/nonfinite_items"]
    assert bad and bad[0].verdict == INCOMPLETE and f"1 of 2 per-item {metric} values of int8-wo" in bad[0].reason
    assert "not finite" in bad[0].reason and not any(c.verdict == PASS for c in checks if c.task == task)
