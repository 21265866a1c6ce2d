"""The fp reference's results, cached across runs, so a matrix of schemes over one model pays for fp once.

What is cached (what fp alone determines and a later run can use without fp's forward):
- ppl: fp's per-token NLL of every window and the whole ``fp@noise`` pair (fp in the run's dtype
  against fp in float32). A hit skips building the float32 model and its forward. fp's forward in
  the run's dtype still runs whenever a scheme is compared with it: the per-token KLD needs fp's full
  logits (vocabulary x tokens, GBs at 7B), which are not worth storing.
- tasks: fp's response to every request of a task (log-likelihoods, greedy flags); a hit skips fp's
  forward for that task entirely.

An entry is keyed by the sha256 of everything that determines it: the model file's hash, the data
(the corpus text's hash and the windows' token ids; a task's requests, which hold its documents,
templates and few-shot examples), the protocol, dtype, kernels, device, batch plan, the versions of
the libraries and the measuring code's own source. Each file holds its key and the sha256 of its
payload; a file that does not parse, holds another key or fails its hash is recomputed and
overwritten, never used. Files live in ``$EVALSUITE_CACHE/fp-reference`` (default
``~/.cache/evalsuite``); ``--fp-cache off`` neither reads nor writes, ``refresh`` recomputes and
overwrites. Each stage says what it did in ``results.json`` (``run.fp_cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = "evalsuite.fp-cache/1"
MODES = ("on", "off", "refresh")
# the source files whose code decides fp's numbers (the key holds their hash)
_MEASURING_CODE = ("measure/perplexity.py", "measure/noise_floor.py", "measure/tasks.py", "measure/lm_adapter.py",
                   "measure/batch_plan.py", "measure/packed.py", "load/fast_forward.py", "load/model.py", "kernels/kld.py",
                   "kernels/llama_fused.py")
_PACKAGES = ("torch", "transformers", "lm_eval", "triton", "numpy", "tokenizers", "datasets")


def cache_dir() -> Path:
    return Path(os.environ.get("EVALSUITE_CACHE", Path.home() / ".cache" / "evalsuite")) / "fp-reference"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``, so
    a reader sees the old file or the new one, never a part (to be merged with iss15's helper)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def code_version() -> str:
    """sha256 over the measuring code's source files."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in _MEASURING_CODE:
        p = root / rel
        h.update(rel.encode())
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    from evalsuite.versions import package_versions

    return package_versions(_PACKAGES)


def run_parts(ctx) -> dict[str, Any]:
    """The parts of a key that every stage shares: model, dtype, kernels, device, code, libraries."""
    import torch

    device = ctx.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = ctx.loaded.info
    return {"model_sha256": info.sha256, "model_format": info.format, "dtype": str(ctx.dtype),
            "kernels": ctx.option("kernels", "fused"), "device": name, "world_size": ctx.world_size,
            "code": code_version(), "versions": library_versions()}


def digest(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


class Entry:
    """One cache entry: ``load()`` gives the payload or None (and why, in ``status``); ``store()``."""

    def __init__(self, ctx, kind: str, parts: dict[str, Any]):
        # "off" where a caller built its RunContext without the option (tests, benchmarks)
        self.mode = str(ctx.option("fp_cache", "off") or "off")
        self.parts = {"kind": kind, **run_parts(ctx), **parts}
        self.key = digest(self.parts)
        self.path = cache_dir() / f"{kind}-{self.key[:32]}.json"
        self.status = {"off": "off", "refresh": "refresh"}.get(self.mode, "miss")
        self._record = ctx.results.run.setdefault("fp_cache", {})
        self._name = kind

    def load(self) -> Any | None:
        if self.mode != "on":
            self._say()
            return None
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self._say()
            return None
        except OSError as e:
            self.status = f"unreadable ({e.strerror}), recomputed"
            self._say()
            return None
        try:
            doc = json.loads(raw)
            ok = (doc.get("schema") == SCHEMA and doc.get("key") == self.key
                  and hashlib.sha256(_canonical(doc["payload"])).hexdigest() == doc.get("payload_sha256"))
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            self.status = "corrupt or stale (key or hash mismatch), recomputed"
            self._say()
            return None
        self.status = "hit"
        self._say()
        return doc["payload"]

    def store(self, payload: Any) -> None:
        if self.mode == "off":
            return
        doc = {"schema": SCHEMA, "key": self.key, "key_parts": self.parts,
               "payload_sha256": hashlib.sha256(_canonical(payload)).hexdigest(), "payload": payload}
        try:
            write_atomic(self.path, json.dumps(doc, separators=(",", ":"), default=str).encode())
        except OSError as e:  # a cache that cannot be written costs time, never the run
            log.warning("fp cache: could not write %s: %s", self.path, e)
            return
        self.status += ", stored"
        self._say()

    def _say(self) -> None:
        self._record[self._name] = {"status": self.status, "path": str(self.path), "key": self.key}
