"""Persistent compile caches: torch.compile's and Triton's work kept in the evaluation cache folder.

The speed stage compiles gpt-fast's decode step (``mode="reduce-overhead"``, coordinate-descent
tuning): minutes on a cold machine, nearly all of the stage. Inductor keeps compiled FX graphs,
AOTAutograd results and autotuning choices on disk, and Triton its compiled kernels; by default
under ``/tmp``, which a fresh or cleaned machine loses. Pointing them into ``$EVALSUITE_CACHE``
(default ``~/.cache/evalsuite``) lets a second run load the graphs instead of recompiling them; the
stage still times compiled decode exactly as before (the warm-up sample holds what compilation is
left). A folder the user set (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``) is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    return Path(os.environ.get("EVALSUITE_CACHE", Path.home() / ".cache" / "evalsuite"))


def use_persistent_caches() -> dict[str, str]:
    """Set the compile cache folders (call before the first compilation); returns them."""
    root = cache_root()
    dirs = {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}
    for var, path in dirs.items():
        os.environ.setdefault(var, path)
    try:
        import torch._inductor.config as cfg

        for name in ("fx_graph_cache", "autotune_local_cache"):
            if hasattr(cfg, name):
                setattr(cfg, name, True)
    except ImportError:  # a torch without inductor compiles nothing
        pass
    return {var: os.environ[var] for var in dirs}


def cache_counters() -> dict[str, Any]:
    """Inductor's FX-graph and AOTAutograd cache hits and misses in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {k: int(v) for group in ("inductor", "aot_autograd") for k, v in counters[group].items()
            if "cache" in k and ("hit" in k or "miss" in k)}
