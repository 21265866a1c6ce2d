"""The ppl stage's noise floor (variant ``fp@noise``): fp in the run's dtype against fp in float32.

The floor gives "KLD zero" a scale; it is not itself gated, so it does not need every window. A
float32 forward costs about 12x a bf16 one on a tensor-core GPU, so the exhaustive floor was the
largest part of the stage at 7B. ``--ppl-noise-floor sample`` (the default) measures it on a
subsample of windows chosen before the pass:

- size rule: n0 = ceil((1.96 x PLAN_CV / TARGET_REL_HALF_WIDTH)^2) windows for a 95% interval of
  +-TARGET_REL_HALF_WIDTH of the floor's kld_mean, where PLAN_CV is a planning coefficient of
  variation of the per-window mean KLD; finite-population corrected, at least MIN_WINDOWS, at most
  all windows. The realised interval is checked against the target and the result stated in the
  record (``extra.noise_floor``); a miss is said plainly.
- choice: the windows are cut into n equal strata in corpus order and one window is drawn from
  each, seeded by ``--seed``: spread over the corpus, the same for every run with the same seed.

The float32 reference is built once per run: where the checkpoint's floating-point tensors are all
stored in the run's dtype (a bf16 safetensors folder run in bf16), the run's own fp weights upcast
are exactly the checkpoint's values, so it is built on the device from them and nothing is reloaded;
otherwise the model is reloaded in float32 (GGUF dequantizes to float32, which bf16 rounds).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

MODES = ("sample", "full", "off")
# per-window mean KLD of bf16 vs fp32 varies little between windows: CV 0.063 measured from the
# full floor of SmolLM2-135M on WikiText-2 (152 windows, 95% CI +-1.0%); planned at 2.4x that
PLAN_CV = 0.15
TARGET_REL_HALF_WIDTH = 0.10  # 95% CI of kld_mean within +-10% of the floor: it is a scale, not a gate
MIN_WINDOWS = 8
Z95 = 1.96
# float32 tensors stored per safetensors dtype name
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def parse_mode(value: Any) -> str:
    """``--ppl-noise-floor`` value → one of MODES (True/False from older callers: sample/off)."""
    if value is True or value is None:
        return "sample"
    if value is False:
        return "off"
    return str(value)


def sample_size(n_windows: int, cv: float = PLAN_CV, target: float = TARGET_REL_HALF_WIDTH,
                minimum: int = MIN_WINDOWS) -> int:
    """Windows the subsample needs by the module's rule (finite-population corrected)."""
    if n_windows <= 0:
        return 0
    n0 = math.ceil((Z95 * cv / target) ** 2)
    n = math.ceil(n0 / (1 + (n0 - 1) / n_windows))
    return min(n_windows, max(minimum, n))


def sample_windows(n_windows: int, seed: int, size: int | None = None) -> np.ndarray:
    """Sorted window indices of the subsample: one drawn from each of ``size`` equal strata."""
    size = sample_size(n_windows) if size is None else min(size, n_windows)
    if size >= n_windows:
        return np.arange(n_windows, dtype=np.int64)
    edges = np.linspace(0, n_windows, size + 1).round().astype(np.int64)
    rng = np.random.default_rng([int(seed), 0x6E6F6973])  # "nois": its own stream, not the bootstrap's
    return np.asarray([rng.integers(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])], dtype=np.int64)


def describe_rule() -> str:
    return (f"n = max({MIN_WINDOWS}, ceil((1.96 x {PLAN_CV} / {TARGET_REL_HALF_WIDTH})^2)) finite-population corrected, "
            f"one window per equal stratum of the corpus, seeded; target: 95% CI of kld_mean within "
            f"+-{TARGET_REL_HALF_WIDTH:.0%} of the floor")


def ci_check(value: float | None, ci95: list[float] | None) -> dict[str, Any]:
    """The realised relative half-width of the floor's interval, and whether it meets the target."""
    if value is None or not ci95 or value <= 0:
        return {"ci_rel_half_width": None, "target_met": False}
    rel = (ci95[1] - ci95[0]) / 2 / value
    return {"ci_rel_half_width": rel, "target_met": bool(rel <= TARGET_REL_HALF_WIDTH)}


def checkpoint_float_dtypes(model_path: str | Path) -> set[torch.dtype] | None:
    """dtypes of the floating-point tensors of a safetensors model folder, from the file headers only
    (no tensor data read); None where that cannot be told (other formats, unreadable headers)."""
    path = Path(model_path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    found: set[torch.dtype] = set()
    try:
        for f in files:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for name, entry in header.items():
                if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_FLOATS:
                    found.add(_SAFETENSORS_FLOATS[entry["dtype"]])
    except (OSError, ValueError, struct.error, AttributeError):
        return None
    return found or None


def upcast_reference(fp: nn.Module, device: torch.device) -> nn.Module:
    """fp's weights in float32 in a freshly built model of its class (buffers such as rotary
    frequencies computed in float32 by the constructor, not upcast from the run's dtype). Each
    tensor is cast into its place: no whole float32 state dict beside the model (27 GB at 7B)."""
    import copy

    with torch.device(device):
        ref = type(fp)(copy.deepcopy(fp.config)).to(torch.float32)
    target, source = ref.state_dict(), fp.state_dict()
    if set(target) != set(source):
        odd = sorted(set(target) ^ set(source))
        raise RuntimeError(f"float32 reference: state dicts differ in {len(odd)} keys, e.g. {odd[0]}")
    with torch.no_grad():
        for name, t in target.items():
            t.copy_(source[name])
    return ref.eval().requires_grad_(False)


def can_upcast(ctx) -> bool:
    """True where the run's fp weights upcast are exactly the checkpoint's values (see module doc)."""
    info = ctx.loaded.info
    if info.format != "hf" or not hasattr(ctx.fp, "config") or ctx.option("tp", 1) > 1:
        return False  # under --tp fp is sharded: the float32 reference is reloaded and sharded alike
    return checkpoint_float_dtypes(info.path) == {ctx.dtype}
