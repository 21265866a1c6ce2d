"""Persistent compile caches: torch.compile's and Triton's work kept in the evaluation cache folder.

The speed stage compiles gpt-fast's decode step (``mode="reduce-overhead"``, coordinate-descent
tuning): minutes on a cold machine, nearly all of the stage. Inductor keeps compiled FX graphs,
AOTAutograd results and autotuning choices on disk, and Triton its compiled kernels; by default
under ``/tmp``, which a fresh or cleaned machine loses. Pointing them into ``$EVALSUITE_CACHE``
(default ``~/.cache/evalsuite``) lets a second run load the graphs instead of recompiling them; the
stage still times compiled decode exactly as before (the warm-up sample holds what compilation is
left). A folder the user set (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``) is left alone.

Besides those folders, each compiled speed-stage program is kept whole, one file a key
(``compiled_program``): PyTorch's mega-cache bytes under ``$EVALSUITE_CACHE/compile/<key>.bin``
with a JSON manifest beside it, the key hashing everything the program depends on. It is portable
(a fresh machine given the folder compiles from it) and says per run whether it was found.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evalsuite.results import write_bytes_atomic


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


# ---------------------------------------------------------------------------- compiled programs, one file a key

COMPILE_DIR = "compile"


def _mega_cache():
    """``torch.compiler``'s save/load of its cache artifacts (torch >= 2.7; 2.11 and 2.13 both have
    them), or None where this torch lacks either."""
    import torch

    c = getattr(torch, "compiler", None)
    if c is None or not (hasattr(c, "save_cache_artifacts") and hasattr(c, "load_cache_artifacts")):
        return None
    return c


def device_label(device) -> str:
    """The GPU's name, or the device type ("cpu"): compiled kernels are tuned for one device."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.get_device_name(device)
    return str(getattr(device, "type", device))


def environment_parts(device) -> dict[str, Any]:
    """What every compiled program depends on beyond its model and call: library versions, the
    device, and the Inductor settings that change the generated or tuned code."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    parts: dict[str, Any] = {"torch": torch.__version__, "triton": triton_version, "device": device_label(device)}
    try:
        import torch._inductor.config as cfg

        parts["inductor"] = {n: getattr(cfg, n) for n in ("coordinate_descent_tuning", "max_autotune")
                             if hasattr(cfg, n)}
    except ImportError:
        pass
    return parts


def model_fingerprint(model) -> str:
    """A hash of a module's structure: every submodule's class and every parameter's and buffer's
    name, shape, dtype and tensor class (a scheme's quantized weights differ in all but the name)."""
    h = hashlib.sha256()
    for name, mod in model.named_modules():
        h.update(f"{name}:{type(mod).__module__}.{type(mod).__qualname__};".encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{type(t).__qualname__};".encode())
    return h.hexdigest()[:16]


def program_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@contextmanager
def compiled_program(parts: dict[str, Any], enabled: bool = True):
    """Around one compilation and its first runs: load the programs stored under ``parts``' key
    (``$EVALSUITE_CACHE/compile/<key>.bin``, PyTorch's mega-cache: FX graphs, AOTAutograd results,
    autotuning choices, Triton kernels) into Inductor's caches first, so that the compilation finds
    them, and store what it made afterwards when nothing usable was there (or Inductor still missed).

    Yields the record of it, which the caller completes (``compile_s``): ``key``, ``status``
    (``hit``: a stored entry was loaded; ``miss``: none was; ``corrupt``: one failed its hash or
    would not load, recomputed; ``unavailable``: this torch has no mega-cache), ``load_s``,
    ``save_s``, ``bytes``, and Inductor's cache counters during the block (``inductor``).
    """
    record: dict[str, Any] = {"key": program_key(parts), "status": "unavailable"}
    mega = _mega_cache() if enabled else None
    if mega is None:
        yield record
        return
    folder = cache_root() / COMPILE_DIR
    binary, manifest = folder / f"{record['key']}.bin", folder / f"{record['key']}.json"
    t0 = time.perf_counter()
    record["status"] = "miss"
    if binary.exists():
        try:
            data = binary.read_bytes()
            stored = json.loads(manifest.read_text())
            if stored.get("sha256") != hashlib.sha256(data).hexdigest():
                raise ValueError("hash differs from the manifest's")
            mega.load_cache_artifacts(data)
            record.update(status="hit", bytes=len(data))
        except Exception as e:  # a torn, edited or incompatible entry is recomputed, never trusted
            record.update(status="corrupt", error=f"{type(e).__name__}: {e}"[:200])
    record["load_s"] = round(time.perf_counter() - t0, 3)
    before = cache_counters()
    with _fresh_artifacts():
        yield record
        after = cache_counters()
        record["inductor"] = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        missed = any("miss" in k for k in record["inductor"])
        if record["status"] != "hit" or missed:
            t0 = time.perf_counter()
            saved = mega.save_cache_artifacts()
            if saved is not None:
                data = saved[0]
                write_bytes_atomic(binary, data)
                write_bytes_atomic(manifest, json.dumps(
                    {"key": record["key"], "parts": parts, "sha256": hashlib.sha256(data).hexdigest(),
                     "bytes": len(data), "created": time.strftime("%Y-%m-%dT%H:%M:%S")},
                    indent=1, sort_keys=True, default=str).encode())
                record.update(saved=True, bytes=len(data))
            record["save_s"] = round(time.perf_counter() - t0, 3)


@contextmanager
def _fresh_artifacts():
    """Collect only this block's artifacts (save_cache_artifacts returns everything the process
    recorded so far otherwise); the manager's own switch, where this torch has it."""
    try:
        from torch.compiler._cache import CacheArtifactManager
    except ImportError:
        CacheArtifactManager = None
    fresh = getattr(CacheArtifactManager, "with_fresh_cache", None)
    if fresh is None:
        yield
        return
    with fresh():
        yield
