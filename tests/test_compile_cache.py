"""Persistent compile caches: the folders go under $EVALSUITE_CACHE unless the user set their own."""

from __future__ import annotations

import os

from evalsuite.measure import compile_cache


def test_compile_caches_live_in_the_evalsuite_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALSUITE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/users/own/triton")
    dirs = compile_cache.use_persistent_caches()
    assert dirs["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert dirs["TRITON_CACHE_DIR"] == "/users/own/triton"  # the user's choice is kept
    import torch._inductor.config as cfg

    assert cfg.fx_graph_cache and all(isinstance(v, int) for v in compile_cache.cache_counters().values())
