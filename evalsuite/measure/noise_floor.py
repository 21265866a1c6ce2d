"""The ppl stage's noise floor (variant ``fp@noise``): fp in the run's dtype against fp in float32.

The floor gives "KLD zero" a scale; it is not itself gated, so it does not need every window. A
float32 forward costs about 12x a bf16 one on a tensor-core GPU, so the exhaustive floor was the
largest part of the stage at 7B. ``--ppl-noise-floor sample`` (the default) measures it on a
subsample of windows chosen before the pass:

- size rule: the smallest n with t_{n-1, 0.975} x PLAN_CV / sqrt(n) <= TARGET_REL_HALF_WIDTH (a 95%
  interval of +-TARGET_REL_HALF_WIDTH of the floor's kld_mean, where PLAN_CV is a planning
  coefficient of variation of the per-window mean KLD), at least MIN_WINDOWS, at most all windows.
  The floor is reported, never gated (the judge quotes a scheme's KLD as a multiple of it, and a
  baseline's floor is compared for information only), so it needs a scale, not a verdict: +-20%.
  Its interval is Student's t over the sampled windows (:func:`evalsuite.stats.ratio_t_interval`;
  a bootstrap over a handful of windows is too narrow), checked against the target and stated in
  the record (``extra.noise_floor``); a miss is said plainly. A float32 forward costs about 14x a
  bf16 one on an H200 (measured at 7B: 0.66 s against 0.047 s a 2048-token window), so every
  window of the sample costs what 14 windows of a scheme do.
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
# full floor of SmolLM2-135M on WikiText-2 (152 windows); planned at 1.6x that
PLAN_CV = 0.10
TARGET_REL_HALF_WIDTH = 0.20  # 95% CI of kld_mean within +-20% of the floor: a scale, not a gate
MIN_WINDOWS = 4
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
    """Windows the subsample needs by the module's rule: the smallest n (at least ``minimum``) whose
    planned t interval t_{n-1} x cv / sqrt(n) is within ``target``; every window if none is."""
    from scipy import stats as sps

    if n_windows <= 0:
        return 0
    for n in range(max(2, minimum), n_windows + 1):
        if sps.t.ppf(0.975, n - 1) * cv / math.sqrt(n) <= target:
            return n
    return n_windows


def sample_windows(n_windows: int, seed: int, size: int | None = None) -> np.ndarray:
    """Sorted window indices of the subsample: one drawn from each of ``size`` equal strata."""
    size = sample_size(n_windows) if size is None else min(size, n_windows)
    if size >= n_windows:
        return np.arange(n_windows, dtype=np.int64)
    edges = np.linspace(0, n_windows, size + 1).round().astype(np.int64)
    rng = np.random.default_rng([int(seed), 0x6E6F6973])  # "nois": its own stream, not the bootstrap's
    return np.asarray([rng.integers(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])], dtype=np.int64)


def describe_rule() -> str:
    return (f"smallest n >= {MIN_WINDOWS} with t(n-1) x {PLAN_CV} / sqrt(n) <= {TARGET_REL_HALF_WIDTH} (planning CV "
            f"{PLAN_CV}), one window per equal stratum of the corpus, seeded; target: 95% t interval of kld_mean "
            f"within +-{TARGET_REL_HALF_WIDTH:.0%} of the floor (a scale for the report, never gated)")


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
