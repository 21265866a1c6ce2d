"""SQNR floors of the layers stage: defaults per scheme, and an override file.

A layer is *under threshold* when its weight SQNR or its output SQNR falls below the floor for its
scheme; a block is under threshold when its hidden-state SQNR does. Floors are in dB (higher is
stricter). The defaults start from torchao's unit-test floors (43 dB for an int8 weight-only layer's
output, 20 dB generic) and are lowered where a real checkpoint with outlier channels sits honestly below
them, keeping about 5 dB under the worst honest layer of SmolLM2-135M on WikiText-2 valid:

    scheme         weight  output  hidden (worst honest SmolLM2 layer / block, dB)
    int8-wo        38.7    33.5    29.7
    int8-dq        38.7    17.7    18.1
    int4-wo-g128   18.2    11.8     8.9

The fp8 floors follow the same rule, ``floor(worst − 5)``, on SmolLM2 measured on an H100
(2026-12-08, ``benchmarks/calibrate_limits.py``'s rule, docs/limits.md):

    scheme         weight  output  hidden (worst, dB)            floors
    fp8-wo         31.5    29.9    21.4                          26 / 24 / 16
    fp8-dq         31.5    27.0    20.4                          26 / 22 / 15

fp8-dq-tensor (one activation scale a tensor) was not measured and keeps the floors reasoned before:
e4m3's 3 mantissa bits give ~29-31 dB of weight SQNR, the floors ~5 dB under torchao's fp8 on an H100
(25.5 dB dynamic), the output and hidden floors at int8's distance from the weight floor: 20 / 14 / 11.

These floors catch gross faults (a dropped bias, wrong-axis scales, a layer at 2-3 bits); subtle
ones (floor instead of round) are caught by the layers stage's peer rule, relative to the model's own
layers of the same kind.

Override file (YAML or JSON), keys are fnmatch patterns over scheme names; the first matching
scheme entry wins, and inside it the first matching ``layers`` pattern::

    int8-wo*:
      weight_sqnr_db: 30
      output_sqnr_db: 30
      hidden_sqnr_db: 15
      layers:
        "model.layers.*.mlp.down_proj": {output_sqnr_db: 25}
    "*":
      output_sqnr_db: 12

Keys that a file leaves out keep the defaults.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evalsuite.config_file import read_mapping
from evalsuite.errors import EvalsuiteError

VIEWS = ("weight_sqnr_db", "output_sqnr_db", "hidden_sqnr_db")


@dataclass(frozen=True)
class Floors:
    """SQNR floors in dB for one layer (or, for ``hidden_sqnr_db``, every block) of one scheme."""

    weight_sqnr_db: float
    output_sqnr_db: float
    hidden_sqnr_db: float


# scheme pattern → floors; first match wins, so specific patterns come before "*"
DEFAULTS: dict[str, dict[str, Any]] = {
    "int8-wo*": {"weight_sqnr_db": 33.0, "output_sqnr_db": 28.0, "hidden_sqnr_db": 24.0},
    "int8-dq*": {"weight_sqnr_db": 33.0, "output_sqnr_db": 12.0, "hidden_sqnr_db": 12.0},
    "int4-wo-*": {"weight_sqnr_db": 13.0, "output_sqnr_db": 6.0, "hidden_sqnr_db": 4.0},
    "fp8-wo*": {"weight_sqnr_db": 26.0, "output_sqnr_db": 24.0, "hidden_sqnr_db": 16.0},
    "fp8-dq-tensor*": {"weight_sqnr_db": 20.0, "output_sqnr_db": 14.0, "hidden_sqnr_db": 11.0},
    "fp8-dq*": {"weight_sqnr_db": 26.0, "output_sqnr_db": 22.0, "hidden_sqnr_db": 15.0},
    "*": {"weight_sqnr_db": 20.0, "output_sqnr_db": 20.0, "hidden_sqnr_db": 10.0},
}

# A layer the scheme's policy keeps in float must come back exact; any error puts it under.
FLOAT_LAYER = Floors(math.inf, math.inf, math.inf)


@dataclass(frozen=True)
class Thresholds:
    """Floors for every (scheme, layer); built from DEFAULTS plus an optional override file."""

    table: dict[str, dict[str, Any]]
    source: str = "defaults"

    def for_scheme(self, scheme: str) -> tuple[Floors, dict[str, dict[str, float]]]:
        entry = _first_match(self.table, scheme) or {}
        fallback = _first_match(DEFAULTS, scheme) or DEFAULTS["*"]
        base = Floors(**{v: float(entry.get(v, fallback[v])) for v in VIEWS})
        return base, entry.get("layers", {}) or {}

    def floors(self, scheme: str, layer: str) -> Floors:
        base, per_layer = self.for_scheme(scheme)
        override = _first_match(per_layer, layer)
        return replace(base, **{k: float(v) for k, v in override.items()}) if override else base

    def hidden_floor(self, scheme: str) -> float:
        return self.for_scheme(scheme)[0].hidden_sqnr_db


def _first_match(table: dict[str, Any], name: str) -> Any:
    for pattern, value in table.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def load_thresholds(path: str | Path | None) -> Thresholds:
    """The defaults, with the entries of ``path`` (YAML or JSON) taking precedence."""
    if path is None:
        return Thresholds(dict(DEFAULTS))
    path = Path(path)
    data = read_mapping(path, "--layer-thresholds", suffixes=(".yaml", ".yml", ".json"))
    _validate(data, path)
    return Thresholds({**data, **{k: v for k, v in DEFAULTS.items() if k not in data}}, source=str(path))


def _validate(data: Any, path: Path) -> None:
    if not isinstance(data, dict) or not data:
        raise EvalsuiteError(f"{path}: expected a mapping of scheme patterns to floors")
    for scheme, entry in data.items():
        if not isinstance(entry, dict):
            raise EvalsuiteError(f"{path}: entry {scheme!r} must be a mapping of floors")
        for key, value in entry.items():
            if key == "layers":
                if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                    raise EvalsuiteError(f"{path}: {scheme}.layers must map layer patterns to floors")
                for layer, floors in value.items():
                    _check_floors(floors, f"{scheme}.layers[{layer!r}]", path, allow_hidden=False)
            else:
                _check_floors({key: value}, scheme, path)


def _check_floors(floors: dict[str, Any], where: str, path: Path, allow_hidden: bool = True) -> None:
    known = VIEWS if allow_hidden else VIEWS[:2]
    for key, value in floors.items():
        if key not in known:
            raise EvalsuiteError(f"{path}: {where}: unknown key {key!r}; known: {', '.join(known)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvalsuiteError(f"{path}: {where}.{key} must be a number of dB, got {value!r}")
