"""Run history: every judged run appended to a SQLite database, and drift against the rolling median.

Tables: ``runs`` (one row per run: id, time, model name and sha256, device, dtype, git revision,
partial flag, results path, failing checks) and ``metrics`` (run id, stage, task, variant = scheme,
metric, value, stderr (from the record's stderr, 95% CI or CV), unit, direction). A run is written in one transaction, so a crash mid-write
leaves the database as it was; re-appending the same results file replaces its rows.

Drift: a point is flagged when it is further from the median of the previous ``window`` runs of the
same series (model × device-dtype × stage/task/variant/metric) than
max(sigma × √(robust σ² + stderr²), rel_floor × |median|), where robust σ = 1.4826 × MAD of those runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import statistics
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from evalsuite.errors import EvalsuiteError
from evalsuite.judge.checks import metric_stderr
from evalsuite.results import Metric, Results

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started TEXT, finished TEXT, model_name TEXT, model_sha TEXT,
    device TEXT, dtype TEXT, git_revision TEXT, partial INTEGER, source TEXT, failing INTEGER);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    stage TEXT, task TEXT, variant TEXT, metric TEXT, value REAL, stderr REAL, unit TEXT,
    higher_is_better INTEGER, PRIMARY KEY (run_id, stage, task, variant, metric));
CREATE INDEX IF NOT EXISTS metrics_series ON metrics (metric, variant, task, stage);
"""


def run_id_of(results: Results) -> str:
    """Stable id of a run: the same results file always gets the same id."""
    run = results.run
    key = json.dumps([run.get("started"), (run.get("model") or {}).get("sha256"), run.get("argv"),
                      run.get("seed"), run.get("git_revision")], sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def connect(path: str | Path, create: bool = True) -> sqlite3.Connection:
    path = Path(path)
    if not create and not path.is_file():
        raise EvalsuiteError(f"{path}: no history database (runs are appended by 'evalsuite run' or 'evalsuite history --add')")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=30)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.executescript(SCHEMA_SQL)
    except sqlite3.DatabaseError as e:
        raise EvalsuiteError(f"{path}: not a usable history database ({e})") from None
    return conn


def _num(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def append_run(path: str | Path, results: Results, source: str | None = None,
               records: Iterable[Metric] | None = None) -> str:
    """Append (or replace) one run in a single transaction; returns its run id."""
    run = results.run
    run_id = run_id_of(results)
    model = run.get("model") or {}
    failing = sum(1 for v in results.verdicts if v.get("failing"))
    with closing(connect(path)) as conn:
        try:
            with conn:  # one transaction: all of the run or none of it
                conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
                conn.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", (
                    run_id, run.get("started"), run.get("finished"), model.get("name"), model.get("sha256"),
                    (run.get("device") or {}).get("type"), run.get("dtype"), run.get("git_revision"),
                    int(results.partial), source, failing))
                conn.executemany("INSERT OR REPLACE INTO metrics VALUES (?,?,?,?,?,?,?,?,?)", (
                    (run_id, m.stage, m.task, m.variant, m.metric, _num(m.value), _num(metric_stderr(m)), m.unit,
                     None if m.higher_is_better is None else int(m.higher_is_better))
                    for m in (results.records if records is None else records)))
        except sqlite3.DatabaseError as e:
            raise EvalsuiteError(f"{path}: could not append run {run_id} ({e}); the database is unchanged") from None
    return run_id


@dataclass
class Point:
    run_id: str
    started: str | None
    git_revision: str | None
    value: float | None
    stderr: float | None
    median: float | None = None
    tolerance: float | None = None
    flag: str = ""


@dataclass
class Series:
    model: str
    sha: str | None
    device: str
    stage: str
    task: str
    variant: str
    metric: str
    unit: str
    higher_is_better: bool | None
    points: list[Point]

    @property
    def label(self) -> str:
        return f"{self.model} [{self.device}] {self.stage}/{self.task}/{self.variant}/{self.metric}"

    @property
    def bad_drift(self) -> bool:
        return bool(self.points) and self.points[-1].flag == "DRIFT-WORSE"


def load_series(path: str | Path, metric: str | None = None, variant: str | None = None, task: str | None = None,
                stage: str | None = None, model: str | None = None, include_partial: bool = False) -> list[Series]:
    """Every matching series, points in run order (oldest first)."""
    where, params = ["1=1"], []
    for col, val in (("m.metric", metric), ("m.variant", variant), ("m.task", task), ("m.stage", stage),
                     ("r.model_name", model)):
        if val is not None:
            where.append(f"{col} = ?")
            params.append(val)
    if not include_partial:
        where.append("r.partial = 0")
    sql = f"""SELECT r.model_name, r.model_sha, r.device || '-' || r.dtype, m.stage, m.task, m.variant, m.metric,
                     m.unit, m.higher_is_better, r.run_id, r.started, r.git_revision, m.value, m.stderr
              FROM metrics m JOIN runs r USING (run_id) WHERE {' AND '.join(where)}
              ORDER BY r.started, r.run_id"""
    with closing(connect(path, create=False)) as conn:
        try:
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as e:
            raise EvalsuiteError(f"{path}: history database unreadable ({e})") from None
    series: dict[tuple, Series] = {}
    for (mname, sha, dev, st, tk, var, met, unit, hib, rid, started, rev, value, se) in rows:
        key = (mname, dev, st, tk, var, met)
        if key not in series:
            series[key] = Series(mname or "?", sha, dev or "?", st, tk, var, met, unit or "",
                                 None if hib is None else bool(hib), [])
        series[key].points.append(Point(rid, started, rev, value, se))
    return list(series.values())


def flag_drift(series: Series, window: int = 5, sigma: float = 3.0, rel_floor: float = 0.005,
               min_history: int = 3) -> Series:
    """Mark each point against the rolling median of the ``window`` runs before it."""
    for i, p in enumerate(series.points):
        prev = [q.value for q in series.points[max(0, i - window):i] if q.value is not None]
        if p.value is None or len(prev) < min_history:
            continue
        med = statistics.median(prev)
        mad = statistics.median(abs(v - med) for v in prev)
        noise = math.sqrt((1.4826 * mad) ** 2 + (p.stderr or 0.0) ** 2)
        p.median, p.tolerance = med, max(sigma * noise, rel_floor * abs(med))
        diff = p.value - med
        if abs(diff) > p.tolerance:
            if series.higher_is_better is None:
                p.flag = "DRIFT"
            else:
                worse = diff < 0 if series.higher_is_better else diff > 0
                p.flag = "DRIFT-WORSE" if worse else "DRIFT-BETTER"
    return series
