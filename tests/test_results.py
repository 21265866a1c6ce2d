"""The results schema: round trip, atomic save, and clear errors for files it cannot read."""

from __future__ import annotations

import json
import math

import pytest

from evalsuite.errors import EvalsuiteError
from evalsuite.results import SCHEMA, Results


def _results() -> Results:
    r = Results(run={"schemes": ["int8-wo"], "partial": False})
    r.add(stage="ppl", task="wikitext2", variant="fp", metric="token_ppl", value=12.5, unit="ppl", n=100,
          higher_is_better=False, stderr=0.1, definition="exp(mean NLL)")
    r.add(stage="ppl", task="wikitext2", variant="int8-wo", metric="kld_mean", value=0.002, unit="nats", n=100,
          higher_is_better=False, ci95=[0.0018, 0.0022], extra={"p99": 0.01})
    return r


def test_roundtrip(tmp_path):
    r = _results()
    r.save(tmp_path / "r.json")
    back = Results.load(tmp_path / "r.json")
    assert back.to_dict() == r.to_dict()
    assert back.variants == ["fp", "int8-wo"]
    assert back.get("ppl", "wikitext2", "int8-wo", "kld_mean").ci95 == [0.0018, 0.0022]


def test_same_key_replaces_the_record():
    r = _results()
    r.add(stage="ppl", task="wikitext2", variant="fp", metric="token_ppl", value=13.0, unit="ppl", n=100,
          higher_is_better=False)
    assert [m.value for m in r.find(metric="token_ppl")] == [13.0]


def test_extend_adds_many_and_replaces_same_keys():
    from evalsuite.results import Metric

    r = _results()
    before = len(r.records)
    r.extend([Metric(stage="ppl", task="wikitext2", variant="fp", metric="token_ppl", value=14.0, unit="ppl", n=1,
                     higher_is_better=False),
              Metric(stage="ppl", task="wikitext2", variant="fp", metric="brand_new", value=1.0, unit="x", n=1,
                     higher_is_better=None)])
    assert len(r.records) == before + 1
    assert [m.value for m in r.find(metric="token_ppl", variant="fp")] == [14.0]
    assert r.get("ppl", "wikitext2", "fp", "brand_new").value == 1.0


def test_nonfinite_values_survive_as_strict_json(tmp_path):
    r = _results()
    r.add(stage="ppl", task="wikitext2", variant="int8-wo", metric="token_ppl", value=math.inf, unit="ppl", n=1,
          higher_is_better=False)
    r.save(tmp_path / "r.json")
    json.loads((tmp_path / "r.json").read_text())  # strict JSON: no bare Infinity
    assert Results.load(tmp_path / "r.json").get("ppl", "wikitext2", "int8-wo", "token_ppl").value == math.inf


def test_save_is_atomic(tmp_path, monkeypatch):
    r = _results()
    r.save(tmp_path / "r.json")
    before = (tmp_path / "r.json").read_text()
    r.run["more"] = 1

    def full_disk(src, dst):  # the write fails half way (content never does: see the nonfinite tests)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("evalsuite.results.os.replace", full_disk)
    with pytest.raises(OSError):
        r.save(tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("text, match", [
    ('{"schema": "evalsuite.results/1", "records": [', "truncated or corrupt"),
    ('{"records": []}', "no 'schema' key"),
    ('{"schema": "evalsuite.results/9", "records": []}', "not supported"),
    ('{"schema": "evalsuite.results/1", "records": [{"stage": "ppl"}]}', "record 0 is malformed"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, text, match):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(EvalsuiteError, match=match) as e:
        Results.load(tmp_path / "r.json")
    assert "\n" not in str(e.value)


def test_schema_tag():
    assert _results().to_dict()["schema"] == SCHEMA == "evalsuite.results/1"


def test_sealed_details_are_encoded_once_and_saved_whole(tmp_path, monkeypatch):
    """A checkpoint re-encodes only what can still change: sealed per-item data keeps its text."""
    import evalsuite.results as results_mod

    r = _results()
    values = r.seal({"acc": [1.0, 0.0, 1.0], "ll": [[-1.5, -2.25], [-0.5, -3.0], [-1.0, -1.0]]})
    r.details["tasks"] = {"arc_easy": {"values": {"fp": values}, "doc_ids": [0, 1, 2], 7: None, True: 1.5}}
    encoded = []
    real_dumps = json.dumps
    monkeypatch.setattr(results_mod.json, "dumps", lambda v, **kw: encoded.append(v) or real_dumps(v, **kw))
    r.save(tmp_path / "r.json")
    r.details["tasks"]["arc_easy"]["doc_ids"].append(3)  # not sealed: the next save shows it
    r.save(tmp_path / "r.json")
    monkeypatch.undo()
    assert sum(v is values for v in encoded) == 1
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["details"] == json.loads(json.dumps(r.details))  # the json module's own text of the same data
    assert back["details"]["tasks"]["arc_easy"]["doc_ids"] == [0, 1, 2, 3]
    assert Results.load(tmp_path / "r.json").to_dict() == json.loads(json.dumps(r.to_dict()))


def test_nonfinite_details_are_null_and_counted_and_never_fail_a_save(tmp_path):
    """A NaN in per-item data (sealed or not) used to raise ValueError in the save, and a run's
    checkpoint lost everything after it: now it is written as null and counted per path."""
    r = _results()
    r.details["tasks"] = {"x": r.seal({"ll": [math.nan, -1.5, math.inf]})}
    r.details["ppl"] = {"variants": {"fp": {"nll_sum": [1.0, math.nan]}}}
    r.run["timing"] = -math.inf
    for _ in range(2):  # a sealed value's cleaned text is reused, and still counted
        r.save(tmp_path / "r.json")
        text = (tmp_path / "r.json").read_text()
        back = json.loads(text)  # strict JSON: no bare NaN
        assert "NaN" not in text and "Infinity" not in text
        assert back["details"]["tasks"]["x"]["ll"] == [None, -1.5, None]
        assert back["details"]["ppl"]["variants"]["fp"]["nll_sum"] == [1.0, None]
        assert back["nonfinite"] == {"details/tasks/x/ll": 2, "details/ppl/variants/fp/nll_sum": 1, "run/timing": 1}
    loaded = Results.load(tmp_path / "r.json")
    assert loaded.nonfinite == back["nonfinite"]
    loaded.save(tmp_path / "again.json")  # the counts survive a re-save of a loaded file
    assert json.loads((tmp_path / "again.json").read_text())["nonfinite"] == back["nonfinite"]


def test_nonfinite_record_fields_say_what_they_were_and_read_back():
    r = _results()
    r.add(stage="ppl", task="t", variant="q", metric="kld_mean", value=math.nan, unit="nats", n=3,
          higher_is_better=False, stderr=math.inf, ci95=[0.1, -math.inf], extra={"floor": math.nan})
    d = json.loads(r.to_json())
    rec = next(x for x in d["records"] if x["task"] == "t")
    assert rec["value"] is None and rec["stderr"] is None and rec["ci95"] == [0.1, None]
    assert rec["extra"]["nonfinite"] == {"value": "nan", "stderr": "inf", "ci95": [None, "-inf"]}
    assert rec["extra"]["floor"] is None and d["nonfinite"]["records/ppl/t/q/kld_mean/extra/floor"] == 1
    m = Results.from_dict(d).get("ppl", "t", "q", "kld_mean")
    assert math.isnan(m.value) and m.stderr == math.inf and m.ci95[0] == 0.1 and m.ci95[1] == -math.inf
    assert "nonfinite" not in m.extra


def test_old_files_with_nan_strings_still_read():
    d = json.loads(_results().to_json())
    d["records"].append({"stage": "ppl", "task": "t", "variant": "q", "metric": "m", "value": "nan", "unit": "x",
                         "n": 1, "higher_is_better": False, "stderr": "inf", "ci95": ["-inf", "1.0"]})
    m = Results.from_dict(d).get("ppl", "t", "q", "m")
    assert math.isnan(m.value) and m.stderr == math.inf and m.ci95 == [-math.inf, 1.0]


def test_values_json_cannot_hold_are_written_as_null_and_named(tmp_path):
    """The last resort of every save (the emergency save of a crashed run too): what cannot be
    encoded is null, named under 'unencodable'; the rest of the file is whole."""
    import numpy as np

    r = _results()
    r.details["odd"] = {"obj": object(), "arr": np.asarray([1.0, np.nan]), "np": np.float32(2.0), (1, 2): "tuple key"}
    r.save(tmp_path / "r.json")
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["details"]["odd"]["obj"] is None and back["details"]["odd"]["arr"] == [1.0, None]
    assert back["details"]["odd"]["np"] == 2.0 and back["details"]["odd"]["(1, 2)"] == "tuple key"
    assert back["unencodable"] == {"details/odd/obj": "object", "details/odd/(1, 2)(key)": "tuple"}
    assert back["nonfinite"] == {"details/odd/arr": 1} and len(back["records"]) == len(r.records)
