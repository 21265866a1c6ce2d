"""The fp-reference cache across runs: reuse, invalidation by any key part, corrupt entries recomputed."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from evalsuite.measure import fp_cache
from evalsuite.measure import perplexity as P
from tests.conftest import make_tiny_llama
from tests.test_perplexity import make_ctx


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fp-reference"


def _ppl_run(tmp_path, model32, reloads: list, text=None, sha="aa", **options):
    def reload(dtype):
        reloads.append(dtype)
        return copy.deepcopy(model32).to(dtype)

    variants = {"fp": copy.deepcopy(model32).bfloat16(), "noisy": copy.deepcopy(model32).bfloat16()}
    with torch.no_grad():
        variants["noisy"].model.layers[0].mlp.down_proj.weight.mul_(1.05)
    opts = dict(fp_cache="on", ppl_noise_floor="full", ppl_windows=6, ppl_batch=3)
    opts.update(options)
    if text is not None:
        opts["text"] = text
    ctx = make_ctx(variants, tmp_path, dtype=torch.bfloat16, reload=reload, **opts)
    ctx.loaded.info.sha256 = sha
    P.run(ctx)
    return ctx


def _records(ctx, variant):
    return [(r.metric, r.value, r.ci95, r.n) for r in ctx.results.records if r.variant == variant]


def test_second_run_reuses_fp_and_gives_identical_fp_records(tmp_path, cache_home):
    model32, reloads = make_tiny_llama(), []
    first = _ppl_run(tmp_path, model32, reloads)
    assert first.results.run["fp_cache"]["ppl"]["status"] == "miss, stored" and len(reloads) == 1
    second = _ppl_run(tmp_path, model32, reloads)
    said = second.results.run["fp_cache"]["ppl"]
    assert said["status"] == "hit" and said["key"] == first.results.run["fp_cache"]["ppl"]["key"]
    assert len(reloads) == 1  # the hit built no float32 model
    assert second.results.details["ppl"]["protocol"]["fp_cache"] == "hit"
    for variant in ("fp", P.NOISE, "noisy"):
        assert _records(second, variant) == _records(first, variant) and _records(first, variant)
    assert second.results.details["ppl"]["paired"][P.NOISE] == first.results.details["ppl"]["paired"][P.NOISE]


@pytest.mark.parametrize("change", ["corpus", "model", "dtype-of-protocol", "batch", "noise-mode", "code"])
def test_a_changed_input_misses(tmp_path, change, monkeypatch):
    model32, reloads = make_tiny_llama(), []
    _ppl_run(tmp_path, model32, reloads)
    kw: dict = {}
    if change == "corpus":
        kw["text"] = "A different corpus . " * 30
    elif change == "model":
        kw["sha"] = "bb"
    elif change == "dtype-of-protocol":
        kw["ppl_context"] = 48
    elif change == "batch":
        kw["ppl_batch"] = 2
    elif change == "noise-mode":
        kw["ppl_noise_floor"] = "sample"
    else:
        monkeypatch.setattr(fp_cache, "code_version", lambda: "edited")
    again = _ppl_run(tmp_path, model32, reloads, **kw)
    assert again.results.run["fp_cache"]["ppl"]["status"] == "miss, stored" and len(reloads) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip-a-value", "other-key"])
def test_a_corrupt_entry_is_recomputed_not_trusted(tmp_path, cache_home, damage):
    model32, reloads = make_tiny_llama(), []
    first = _ppl_run(tmp_path, model32, reloads)
    (path,) = cache_home.glob("ppl-*.json")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        doc = json.loads(raw)
        if damage == "flip-a-value":
            doc["payload"]["fp_nll"][0][0] += 1.0  # a planted wrong fp value, hash left as it was
        else:
            doc["key"] = "0" * 64
        path.write_text(json.dumps(doc))
    again = _ppl_run(tmp_path, model32, reloads)
    assert again.results.run["fp_cache"]["ppl"]["status"].startswith("corrupt") and len(reloads) == 2
    assert _records(again, "fp") == _records(first, "fp")
    third = _ppl_run(tmp_path, model32, reloads)  # the entry was rewritten whole
    assert third.results.run["fp_cache"]["ppl"]["status"] == "hit" and _records(third, "fp") == _records(first, "fp")


def test_cache_off_and_refresh(tmp_path, cache_home):
    model32, reloads = make_tiny_llama(), []
    off = _ppl_run(tmp_path, model32, reloads, fp_cache="off")
    assert off.results.run["fp_cache"]["ppl"]["status"] == "off" and not list(cache_home.glob("*.json"))
    _ppl_run(tmp_path, model32, reloads)
    refreshed = _ppl_run(tmp_path, model32, reloads, fp_cache="refresh")
    assert refreshed.results.run["fp_cache"]["ppl"]["status"] == "refresh, stored" and len(reloads) == 3


def test_write_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "d" / "entry.json"
    fp_cache.write_atomic(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fp_cache.os, "replace", boom)
    with pytest.raises(OSError):
        fp_cache.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["entry.json"]


def test_tasks_reuse_fp_answers(smollm2, data_dir, monkeypatch):
    from evalsuite.measure import tasks as stage
    from tests.test_tasks import _context

    calls = []
    answer = stage.answer

    def counting(lm, *a, **k):
        calls.append(lm.model is smollm2.model)
        return answer(lm, *a, **k)

    monkeypatch.setattr(stage, "answer", counting)
    first = _context(smollm2, data_dir, tasks="copa", task_limit=2, fp_cache="on")
    stage.run(first)
    second = _context(smollm2, data_dir, tasks="copa", task_limit=2, fp_cache="on")
    stage.run(second)
    assert calls == [True, False, False]  # fp answered once, int8-wo twice
    assert second.results.run["fp_cache"]["tasks-copa"]["status"] == "hit"
    d1, d2 = first.results.details["tasks"]["copa"], second.results.details["tasks"]["copa"]
    assert d1["loglikelihoods"]["fp"] == d2["loglikelihoods"]["fp"] and d1["values"]["fp"] == d2["values"]["fp"]
    assert [r.value for r in first.results.find(variant="fp")] == [r.value for r in second.results.find(variant="fp")]
