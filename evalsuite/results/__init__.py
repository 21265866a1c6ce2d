"""The one results type: what measure produces, judge annotates and report renders.

A results file is JSON with this shape (schema ``evalsuite.results/1``)::

    {
      "schema": "evalsuite.results/1",
      "run":      {...metadata: model, schemes, device, dtype, versions, seeds, timings...},
      "records":  [{stage, task, variant, metric, value, unit, n, higher_is_better,
                    stderr, ci95, definition, extra}, ...],
      "details":  {stage: {...per-item / per-window data for histograms and significance}},
      "errors":   [{stage, variant, message}, ...],
      "verdicts": [{check, verdict, reason, ...}, ...],
      "nonfinite":   {"<path>": count, ...},        (only when there were some)
      "unencodable": {"<path>": "<type name>", ...}  (only when there were some)
    }

JSON has no NaN or infinity, and no value may make a save fail (a checkpoint that raises loses the
run). So:

- a non-finite number (NaN, inf, -inf) anywhere is written as ``null``, and ``nonfinite`` counts
  them per path (``"details/tasks/copa/values/int8-wo/acc": 1``; list indices are not part of the
  path, so a list of 500 windows with 3 NaNs counts 3); a record's own ``value``, ``stderr`` and
  ``ci95`` entries also say what they were in ``extra.nonfinite`` (``{"value": "nan", "ci95": [null,
  "inf"]}``), and reading restores them, so a record reads back as it was written;
- a value JSON cannot hold at all (an object of unknown type, a key that is not a string or a number)
  is written as ``null`` (the key as its ``str``), and ``unencodable`` names its path and type;
- a value that cannot exist is not stored at all: a generated answer has no log-likelihood, so a
  generative task's details have no ``loglikelihoods`` entry (``"loglikelihoods": "not applicable"``).

Older files wrote non-finite numbers as the strings ``"nan"``, ``"inf"``, ``"-inf"``; they still read.

This module never imports torch: reporters and the judge read results files only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evalsuite.errors import EvalsuiteError
from evalsuite.results.verdicts import GateResult

SCHEMA = "evalsuite.results/1"
SCHEMA_FAMILY = "evalsuite.results/"
SUPPORTED_SCHEMAS = (SCHEMA,)

REQUIRED_RECORD_KEYS = ("stage", "task", "variant", "metric", "value", "unit", "n", "higher_is_better")


@dataclass
class Metric:
    """One measured number, with its unit, sample size and (where one exists) uncertainty.

    ``variant`` is ``"fp"`` for the reference or a scheme name such as ``"int8-wo"``; paired
    metrics (quantized against fp) carry the quantized variant's name.
    ``ci95`` is a two-element [low, high] list; ``stderr`` is one standard error.
    ``higher_is_better`` is None for descriptive numbers that have no good direction.
    """

    stage: str
    task: str
    variant: str
    metric: str
    value: float | None
    unit: str
    n: int
    higher_is_better: bool | None
    stderr: float | None = None
    ci95: list[float] | None = None
    definition: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.stage, self.task, self.variant, self.metric)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a non-finite value, stderr or ci95 entry becomes None, and ``extra.nonfinite``
        says what it was (read back by ``from_dict``)."""
        d = asdict(self)
        kinds: dict[str, Any] = {}
        for k in ("value", "stderr"):
            if _nonfinite_kind(d[k]) is not None:
                kinds[k], d[k] = _nonfinite_kind(d[k]), None
        if d["ci95"] is not None:
            ci = [_nonfinite_kind(x) for x in d["ci95"]]
            if any(c is not None for c in ci):
                kinds["ci95"] = ci
                d["ci95"] = [None if c is not None else x for x, c in zip(d["ci95"], ci)]
        if kinds:
            d["extra"] = {**d["extra"], "nonfinite": kinds}
        if not d["extra"]:
            del d["extra"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Metric":
        missing = [k for k in REQUIRED_RECORD_KEYS if k not in d]
        if missing:
            raise ValueError(f"record lacks {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        kinds = (kwargs.get("extra") or {}).get("nonfinite")
        if isinstance(kinds, dict):  # written by to_dict: restore what the nulls were
            kwargs["extra"] = {k: v for k, v in kwargs["extra"].items() if k != "nonfinite"}
            for k in ("value", "stderr"):
                if kwargs.get(k) is None and isinstance(kinds.get(k), str):
                    kwargs[k] = float(kinds[k])
            ci = kinds.get("ci95")
            if isinstance(kwargs.get("ci95"), list) and isinstance(ci, list) and len(ci) == len(kwargs["ci95"]):
                kwargs["ci95"] = [float(c) if x is None and isinstance(c, str) else x for x, c in zip(kwargs["ci95"], ci)]
        for k in ("value", "stderr"):
            if kwargs.get(k) is not None:
                kwargs[k] = float(kwargs[k])  # also the strings "nan", "inf" of older files
        if kwargs.get("ci95") is not None:
            kwargs["ci95"] = [math.nan if x is None else float(x) for x in kwargs["ci95"]]
        return cls(**kwargs)


def _nonfinite_kind(x: Any) -> str | None:
    """"nan", "inf" or "-inf" for a non-finite float, else None."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else "inf" if x > 0 else "-inf"
    return None


def json_number(x: float | None) -> float | str | None:
    """JSON has no NaN or inf; keep them visible as strings rather than dropping them."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write strict JSON to a temp file beside ``path``, then rename it over ``path``."""
    return write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically, as ``write_bytes_atomic``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would give: the replaced file's, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask; read from /proc where it can be (setting it to read it races with threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path``: a crash or a
    full disk never leaves half a file, and the old file stays whole. Every file evalsuite writes
    goes through here. No fsync: it guards against a power cut, not a crash, and the tasks stage
    checkpoints dozens of times a run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp's 0600 would make results and reports private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a write error names no file: name ours
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return path


def _json_key(key: Any) -> str:
    """A dict key as ``json`` writes it (strings, and numbers, booleans and None as strings)."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key, allow_nan=False)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


class _Report:
    """Where a save met values JSON cannot hold: non-finite numbers (counted per path) and values of
    other types (named per path)."""

    def __init__(self) -> None:
        self.nonfinite: dict[str, int] = {}
        self.unencodable: dict[str, str] = {}

    def merge(self, other: "_Report") -> None:
        for k, n in other.nonfinite.items():
            self.nonfinite[k] = self.nonfinite.get(k, 0) + n
        self.unencodable.update(other.unencodable)


def _clean(value: Any, path: str, report: _Report) -> Any:
    """``value`` with every non-finite float as None and every value JSON cannot hold as None (a
    key as its ``str``), each noted in ``report`` under ``path``. Numpy (and torch) scalars and
    arrays become numbers and lists through their ``tolist``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        report.nonfinite[path] = report.nonfinite.get(path, 0) + 1
        return None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = _report_key(k, path, report)
            out[key] = _clean(v, f"{path}/{key}", report)
        return out
    if isinstance(value, (list, tuple)):
        return [_clean(v, path, report) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return _clean(tolist(), path, report)
        except Exception:  # noqa: BLE001 - whatever it is, it must not fail the save
            pass
    if isinstance(value, (int, float)):  # a subclass such as numpy's float64
        return _clean(float(value) if isinstance(value, float) else int(value), path, report)
    report.unencodable[path] = type(value).__name__
    return None


def _report_key(key: Any, path: str, report: _Report) -> str:
    """A dict key as JSON writes it; one JSON cannot hold is written as its ``str`` and named."""
    try:
        return _json_key(key)
    except TypeError:
        report.unencodable[f"{path}/{key}(key)"] = type(key).__name__
        return str(key)


def _dumps(value: Any, path: str, report: _Report) -> str:
    """Strict JSON text of ``value`` through the C encoder; what it cannot hold, cleaned (``_clean``)."""
    try:
        return json.dumps(value, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return json.dumps(_clean(value, path, report), allow_nan=False)


def _encode(value: Any, sealed: dict[int, list], path: str, report: _Report) -> str:
    """Strict JSON text of ``value`` through the C encoder, where a sealed value (reached through
    dicts) is encoded once and its text reused (with what cleaning it needed)."""
    entry = sealed.get(id(value))
    if entry is not None and entry[0] is value:
        if entry[1] is None:
            own = _Report()
            entry[1], entry[2] = _dumps(value, path, own), own
        report.merge(entry[2])
        return entry[1]
    if isinstance(value, dict) and sealed:
        parts = []
        for k, v in value.items():
            key = _report_key(k, path, report)
            parts.append(f"{json.dumps(key)}: {_encode(v, sealed, f'{path}/{key}', report)}")
        return "{" + ", ".join(parts) + "}"
    return _dumps(value, path, report)


@dataclass
class Results:
    run: dict[str, Any] = field(default_factory=dict)
    records: list[Metric] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    schema: str = SCHEMA
    # where earlier saves wrote null for a non-finite number (as read from a file; see the module doc)
    nonfinite: dict[str, int] = field(default_factory=dict)
    # id -> [value, its JSON text once encoded, its _Report]: per-item data that will not change again
    _sealed: dict[int, list] = field(default_factory=dict, repr=False, compare=False)

    def seal(self, value: Any) -> Any:
        """Promise that ``value`` (a dict's value somewhere under ``details``) will not change again:
        each save then reuses its JSON text instead of encoding it anew. A stage checkpoints after
        every variant, and re-encoding the per-item data of the earlier ones made each checkpoint
        slower than the last (1.5 s over the eight tasks' 16 checkpoints on an H200 host)."""
        self._sealed[id(value)] = [value, None, None]
        return value

    def add(self, **kwargs: Any) -> Metric:
        """Append one record; replaces an earlier record with the same key (a re-run stage)."""
        m = Metric(**kwargs)
        self.records = [r for r in self.records if r.key != m.key]
        self.records.append(m)
        return m

    def extend(self, metrics: list[Metric]) -> None:
        """Append many records at once, replacing earlier ones with the same keys (one scan of the
        records, where ``add`` per record rescans them each time)."""
        keys = {m.key for m in metrics}
        self.records = [r for r in self.records if r.key not in keys] + list(metrics)

    def find(
        self,
        stage: str | None = None,
        task: str | None = None,
        variant: str | None = None,
        metric: str | None = None,
    ) -> list[Metric]:
        return [
            r
            for r in self.records
            if (stage is None or r.stage == stage)
            and (task is None or r.task == task)
            and (variant is None or r.variant == variant)
            and (metric is None or r.metric == metric)
        ]

    def get(self, stage: str, task: str, variant: str, metric: str) -> Metric | None:
        found = self.find(stage, task, variant, metric)
        return found[0] if found else None

    def add_error(self, stage: str, message: str, variant: str | None = None) -> None:
        self.errors.append({"stage": stage, "variant": variant, "message": message})

    @property
    def variants(self) -> list[str]:
        """Variants in run order: ``fp`` first, then the schemes as given."""
        order = ["fp", *self.run.get("schemes", [])]
        seen = {r.variant for r in self.records}
        return [v for v in order if v in seen] + sorted(seen - set(order))

    @property
    def scheme_variants(self) -> list[str]:
        """The quantized variants that have records, in run order (not ``fp``, nor derived ones
        such as ``fp@noise`` or ``int8-wo@triton``)."""
        return [v for v in self.variants if v != "fp" and "@" not in v]

    @property
    def partial(self) -> bool:
        return bool(self.run.get("partial"))

    @property
    def passed(self) -> bool:
        """The last gate passed: judged, nothing failing, nothing incomplete or invalid (exit code 0 of
        ``evalsuite gate``). ``table()`` and ``gate()`` are the Python API's (``evalsuite.Results``, in
        ``evalsuite.commands.api``): this schema imports neither the judge nor the reporters."""
        return GateResult(self.verdicts).passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "run": self.run,
            "records": [r.to_dict() for r in self.records],
            "details": self.details,
            "errors": self.errors,
            "verdicts": self.verdicts,
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "results") -> "Results":
        if not isinstance(d, dict) or "schema" not in d:
            raise EvalsuiteError(f"{source}: not an evalsuite results file (no 'schema' key)")
        schema = d["schema"]
        if schema not in SUPPORTED_SCHEMAS:
            raise EvalsuiteError(
                f"{source}: results schema {schema!r} is not supported (this evalsuite reads "
                f"{', '.join(SUPPORTED_SCHEMAS)})"
            )
        records = []
        for i, r in enumerate(d.get("records", [])):
            try:
                records.append(Metric.from_dict(r))
            except (ValueError, TypeError) as e:
                raise EvalsuiteError(f"{source}: record {i} is malformed: {e}") from None
        nonfinite = d.get("nonfinite")
        return cls(
            run=d.get("run", {}),
            records=records,
            details=d.get("details", {}),
            errors=d.get("errors", []),
            verdicts=d.get("verdicts", []),
            schema=schema,
            nonfinite=dict(nonfinite) if isinstance(nonfinite, dict) else {},
        )

    def to_json(self) -> str:
        """The results file's text: strict JSON (no NaN or inf), one line per top-level key and per
        record, through the C encoder (``json``'s indenting encoder is pure Python, ~3x slower).
        Never raises on content: what JSON cannot hold is written as null and listed (module doc)."""
        report = _Report()
        d = self.to_dict()
        records = ",\n  ".join(
            _dumps(r, "records/" + "/".join(str(r.get(k)) for k in ("stage", "task", "variant", "metric")), report)
            for r in d.pop("records"))
        parts = [f'{json.dumps(k)}: {_encode(v, self._sealed, k, report)}' for k, v in d.items()]
        parts.insert(2, f'"records": [\n  {records}\n ]' if records else '"records": []')
        nonfinite = {**self.nonfinite, **report.nonfinite}
        if nonfinite:
            parts.append(f'"nonfinite": {json.dumps(nonfinite)}')
        if report.unencodable:
            parts.append(f'"unencodable": {json.dumps(report.unencodable)}')
        return "{\n " + ",\n ".join(parts) + "\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically so a crash never leaves half a results file."""
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Results":
        path = Path(path)
        if not path.is_file():
            raise EvalsuiteError(f"{path}: no such results file")
        try:
            data = json.loads(path.read_text())
        except UnicodeDecodeError:
            raise EvalsuiteError(f"{path}: not a results file (not UTF-8 text)") from None
        except json.JSONDecodeError as e:
            raise EvalsuiteError(f"{path}: truncated or corrupt results file ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data, source=str(path))

