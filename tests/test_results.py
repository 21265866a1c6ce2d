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
    r.run["bad"] = object()  # not serializable: the save fails half way
    with pytest.raises(TypeError):
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


def test_nan_in_details_is_refused(tmp_path):
    r = _results()
    r.details["tasks"] = {"x": r.seal({"ll": [math.nan]})}
    with pytest.raises(ValueError):
        r.save(tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
