"""Persistent compile caches: the folders go under $EVALSUITE_CACHE unless the user set their own;
the speed stage's compiled programs are stored one file a key and found again by a later run."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from evalsuite.load import gptfast
from evalsuite.measure import compile_cache, speed
from evalsuite.quantize import parse_scheme, quantize_

CPU = torch.device("cpu")


def test_compile_caches_live_in_the_evalsuite_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/users/own/triton")
    dirs = compile_cache.use_persistent_caches()
    assert dirs["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert dirs["TRITON_CACHE_DIR"] == "/users/own/triton"  # the user's choice is kept
    import torch._inductor.config as cfg

    assert cfg.fx_graph_cache and all(isinstance(v, int) for v in compile_cache.cache_counters().values())


def _compile_and_time(x: torch.Tensor, w: torch.Tensor, key: dict) -> tuple:
    """The speed stage's compile helper on a one-kernel function, timed as the stage times."""
    def f(x, w):
        return torch.nn.functional.silu(x @ w) * 2

    run = lambda fn: speed.time_samples(lambda: fn(x, w), CPU, 2, 1)  # noqa: E731
    return speed._run_soft_compiled(f, dict(fullgraph=True), run, speed.CompileSettings(key=key))


def test_a_second_compile_loads_the_stored_program_and_a_changed_key_does_not(tmp_path, monkeypatch):
    """First run: miss, the program is stored. Second run on an empty Inductor folder (as a fresh
    machine's process with only $EVALSUITE_CACHE kept): hit, and Inductor's FX-graph cache hits.
    Another dtype or shape: another key, a miss."""
    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path / "evalsuite"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-1"))
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    _, compiled, error, first = _compile_and_time(x, w, {"dtype": "float32", "shape": [4, 8]})
    if not compiled:
        pytest.skip(f"torch.compile does not work on this machine: {error}")
    assert first["status"] == "miss" and first["saved"] and first["compile_s"] > 0
    stored = tmp_path / "evalsuite" / "compile" / f"{first['key']}.bin"
    manifest = json.loads(stored.with_suffix(".json").read_text())
    assert manifest["bytes"] == stored.stat().st_size > 0 and manifest["parts"]["torch"] == torch.__version__

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-2"))
    _, compiled, _, second = _compile_and_time(x, w, {"dtype": "float32", "shape": [4, 8]})
    assert compiled and second["status"] == "hit" and second["key"] == first["key"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and "fxgraph_cache_miss" not in second["inductor"]

    xb, wb = x.bfloat16(), w.bfloat16()
    _, compiled, _, other = _compile_and_time(xb, wb, {"dtype": "bfloat16", "shape": [4, 8]})
    assert compiled and other["status"] == "miss" and other["key"] != first["key"]


def test_a_damaged_stored_program_is_recomputed_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path))
    parts = {"program": "decode_one_token", "dtype": "float32"}
    key = compile_cache.program_key(parts)
    folder = tmp_path / "compile"
    folder.mkdir()
    (folder / f"{key}.bin").write_bytes(b"not a cache")
    (folder / f"{key}.json").write_text(json.dumps({"sha256": "0" * 64}))
    with compile_cache.compiled_program(parts) as record:
        pass
    assert record["status"] == "corrupt" and "hash" in record["error"]


def test_the_key_follows_shapes_dtype_scheme_and_device():
    def key(model, **call):
        return compile_cache.program_key({**speed._program_key(model, "fp", CPU, **call),
                                          **compile_cache.environment_parts(CPU)})

    fp32 = gptfast.random_model("tiny", CPU, torch.float32, seed=0)
    base = key(fp32, batch=1, cache_len=37)
    assert key(gptfast.random_model("tiny", CPU, torch.float32, seed=1), batch=1, cache_len=37) == base  # weights' values
    assert key(gptfast.random_model("tiny", CPU, torch.bfloat16, seed=0), batch=1, cache_len=37) != base
    assert key(fp32, batch=2, cache_len=37) != base and key(fp32, batch=1, cache_len=40) != base
    assert key(quantize_(copy.deepcopy(fp32), parse_scheme("int8-wo")), batch=1, cache_len=37) != base
    assert compile_cache.environment_parts(CPU)["device"] == "cpu"
