"""``evalsuite nightly``: run a matrix of models × schemes × stages from one config file.

Each matrix entry is one ``evalsuite run`` in its own process (under ``torchrun`` when it asks for
several GPUs), so an OOM or a crash in one entry cannot take the others down. Every entry's outcome
is written the moment it finishes (``OUT/entries/<name>/entry.json``) together with the matrix
summary (``summary.json``, ``summary.md``, ``junit.xml``); re-running with the same ``--out``
skips the entries that already finished with an unchanged command (``--rerun`` runs them again).

Entry status:
  PASS   the run finished and no gate failed.
  FAIL   the run finished and a gate failed: a regression (the run's exit code 1 with a failing
         verdict in its results.json).
  ERROR  the run could not give a verdict: a usage or input error (exit 2, e.g. a missing model),
         a crash (exit 3, a traceback, an OOM), an INCOMPLETE run (exit 4) or INVALID results
         (exit 5), a timeout, or no readable results.json.
  NOT-RUN  (``--report-only``) no outcome recorded for the entry in OUT.

Exit code of the matrix (the codes of ``evalsuite.judge.checks``): 1 when any entry FAILed; otherwise
4 (INCOMPLETE) when any entry is ERROR or NOT-RUN; otherwise 0. A regression takes precedence over an error: it is a finding about the models that
must block a release whatever else broke, while an error says the matrix is incomplete. A config
file that does not validate exits 2 before anything runs.

Clean-up: SIGTERM, SIGHUP and SIGINT to the matrix end the running entry's whole process group
(SIGTERM, then SIGKILL after a grace period), record it as ERROR and write the summary. An entry
whose matrix died without that chance (SIGKILL) is ended by its own watchdog thread (see
``start_entry_watchdog``): when the matrix process is gone, or its ``timeout_s`` has passed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evalsuite.config_file import read_mapping
from evalsuite.errors import EvalsuiteError, raise_interrupted, signal_name

SCHEMA = "evalsuite.nightly/1"
PASS, FAIL, ERROR, NOT_RUN = "PASS", "FAIL", "ERROR", "NOT-RUN"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# entry key → (type check, help); every key may also sit under ``defaults`` or ``matrix``
ENTRY_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "name": (str, "entry name: its folder under OUT/entries and its row in the summary"),
    "model": (str, "model path (HF dir, .gguf, gpt-fast .pth); empty = the default SmolLM2"),
    "arch": (str, "architecture of a gpt-fast checkpoint"),
    "tokenizer": (str, "tokenizer path"),
    "quant": ((str, list), "schemes, a list or comma separated"),
    "stages": ((str, list), "stages, a list or comma separated; 'all' or 'none'"),
    "skip_layers": ((str, list), "fnmatch patterns of linear layers kept in float"),
    "limit": (int, "at most N windows/items per task"),
    "device": (str, "auto, cuda or cpu"),
    "dtype": (str, "bf16, fp16 or fp32"),
    "seed": (int, "random seed"),
    "data_dir": (str, "local evaluation data"),
    "nproc": (int, "processes (GPUs) for this entry; > 1 runs it under torchrun"),
    "tp": (int, "tensor-parallel ranks per replica (--tp); must divide nproc"),
    "timeout_s": ((int, float), "wall-clock limit of the entry in seconds"),
    "gates": ((str, dict), "gate limits: a gates YAML path or the same mapping inline"),
    "baseline": (str, "baseline file to gate against"),
    "baselines": (str, "baseline folder, looked up by model and variant"),
    "strict": (bool, "an IMPROVED check fails too"),
    "sigma": ((int, float), "baseline tolerance in standard errors"),
    "alpha": ((int, float), "family-wise false-alarm budget of the entry's gated checks (default: 1% over the night, "
                            "split evenly across the entries)"),
    "args": ((str, list), "further 'evalsuite run' arguments, verbatim"),
}
NIGHT_ALPHA = 0.01  # family-wise false-alarm budget of a whole night
TOP_KEYS = ("schema", "defaults", "matrix", "entries", "history")
MATRIX_AXES = ("model", "quant", "stages")
PATH_KEYS = ("model", "tokenizer", "data_dir", "baseline", "baselines")
WATCHDOG_ENV = "EVALSUITE_WATCHDOG"  # "<matrix pid>:<deadline, epoch seconds, or 0>"
GRACE_S = 5.0  # SIGTERM → SIGKILL: time for a run to record where it stopped
WATCHDOG_SLACK_S = 5.0  # the matrix's own timeout fires first; the watchdog's is the backstop


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="matrix file, YAML (.yaml/.yml) or TOML (.toml); see docs/nightly.md")
    p.add_argument("--out", help="output folder (default reports/nightly/<UTC date>-<config name>); "
                                 "the same folder resumes an interrupted matrix")
    p.add_argument("--only", help="run only these entries (comma separated names); the summary keeps the "
                                  "others' recorded outcomes")
    p.add_argument("--rerun", action="store_true", help="run finished entries again instead of skipping them")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: summarise the outcomes already in --out (the release gate)")
    p.add_argument("--dry-run", action="store_true", help="print each entry's command and exit")
    p.add_argument("--history", help="SQLite history every entry is appended to (default: the config's "
                                     "'history', else reports/history.sqlite)")
    p.add_argument("--no-history", action="store_true", help="append no entry to the history")


@dataclass
class Entry:
    """One matrix row after defaults and matrix expansion: everything its run needs."""

    name: str
    options: dict[str, Any]
    source: str  # where it came from in the config, for error messages
    default_alpha: float | None = None  # this entry's share of the night's false-alarm budget

    def command(self, out_dir: Path, history: Path | None) -> list[str]:
        """The ``evalsuite run`` command line of this entry (under torchrun when nproc > 1)."""
        o = self.options
        nproc = o.get("nproc", 1)
        if nproc > 1:
            head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    "-m", "evalsuite", "run"]
        else:
            head = [sys.executable, "-m", "evalsuite", "run"]
        cmd = head + ["--out", str(out_dir), "--no-progress"]
        if o.get("model"):
            cmd += ["--model", o["model"]]
        for key in ("arch", "tokenizer", "device", "dtype", "data_dir", "baseline", "baselines"):
            if o.get(key) is not None:
                cmd += [f"--{key.replace('_', '-')}", str(o[key])]
        for key in ("quant", "stages", "skip_layers"):
            if o.get(key) is not None:
                cmd += [f"--{key.replace('_', '-')}", ",".join(_as_list(o[key]))]
        for key in ("limit", "seed", "sigma", "tp"):
            if o.get(key) is not None:
                cmd += [f"--{key}", str(o[key])]
        alpha = o.get("alpha", self.default_alpha)
        if alpha is not None:
            cmd += ["--alpha", f"{alpha:.6g}"]
        if isinstance(o.get("gates"), str):
            cmd += ["--gates", o["gates"]]
        elif isinstance(o.get("gates"), dict):
            cmd += ["--gates", str(out_dir / "gates.yaml")]
        if o.get("strict"):
            cmd.append("--strict")
        cmd += ["--history", str(history)] if history is not None else ["--no-history"]
        args = o.get("args") or []
        return cmd + (shlex.split(args) if isinstance(args, str) else [str(a) for a in args])

    def fingerprint(self, command: list[str]) -> str:
        """Changes when anything that shapes the entry's result changes, so resume reruns it."""
        blob = json.dumps({"command": command[1:], "gates": self.options.get("gates")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Outcome:
    """What one entry's run produced; saved as ``entry.json`` and as a row of the summary."""

    name: str
    status: str
    message: str = ""
    exit_code: int | None = None
    seconds: float | None = None
    command: list[str] = field(default_factory=list)
    fingerprint: str = ""
    results: str | None = None
    log: str | None = None
    model: str | None = None
    quant: str | None = None
    stages: str | None = None
    verdicts: dict[str, int] = field(default_factory=dict)
    failing_checks: list[dict[str, Any]] = field(default_factory=list)
    finished: str | None = None
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Outcome":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------
# config

def load_config(path: Path) -> dict[str, Any]:
    """Read a YAML or TOML matrix file; any problem is one line naming the file."""
    return read_mapping(path, "--config", suffixes=(".yaml", ".yml", ".toml"))


def expand_entries(data: dict[str, Any], source: str) -> list[Entry]:
    """``defaults`` under every entry; ``matrix`` blocks expanded as the product of their list-valued
    ``model`` / ``quant`` / ``stages`` axes; then the explicit ``entries``. Validates everything that
    can be checked without loading a model, so a typo fails before hours of GPU time."""
    unknown = set(data) - set(TOP_KEYS)
    if unknown:
        raise EvalsuiteError(f"{source}: unknown top-level keys {', '.join(sorted(unknown))}; known: {', '.join(TOP_KEYS)}")
    if data.get("schema", SCHEMA) != SCHEMA:
        raise EvalsuiteError(f"{source}: schema {data['schema']!r} is not supported (this evalsuite reads {SCHEMA})")
    defaults = _check_options(data.get("defaults") or {}, f"{source}: defaults")
    rows: list[tuple[dict[str, Any], str]] = []
    matrices = data.get("matrix") or []
    for i, block in enumerate(matrices if isinstance(matrices, list) else [matrices]):
        where = f"{source}: matrix[{i}]"
        if not isinstance(block, dict):
            raise EvalsuiteError(f"{where}: expected a mapping")
        # a list on an axis lists alternatives; several schemes in one run are a comma separated string
        axes = {k: block[k] if isinstance(block[k], list) else [block[k]] for k in MATRIX_AXES if k in block}
        fixed = {k: v for k, v in block.items() if k not in axes}
        for values in itertools.product(*axes.values()):
            row = {**fixed, **dict(zip(axes, values))}
            if "name" in row:  # in a matrix, 'name' stands for the model in the generated names
                row["name"] = _auto_name({**row, "model": row["name"]})
            rows.append((row, where))
    entries = data.get("entries") or []
    if not isinstance(entries, list):
        raise EvalsuiteError(f"{source}: entries: expected a list of mappings")
    for i, row in enumerate(entries):
        if not isinstance(row, dict):
            raise EvalsuiteError(f"{source}: entries[{i}]: expected a mapping")
        rows.append((row, f"{source}: entries[{i}]"))
    if not rows:
        raise EvalsuiteError(f"{source}: no entries (give 'entries' or a 'matrix')")
    out: list[Entry] = []
    for row, where in rows:
        options = {**defaults, **_check_options(row, where)}
        name = options.pop("name", None) or _auto_name(options)
        if not NAME_RE.match(name):
            raise EvalsuiteError(f"{where}: entry name {name!r} must be letters, digits, '_', '.' or '-'")
        out.append(Entry(name=name, options=options, source=where))
    for e in out:  # Bonferroni across the entries, Holm within each: the night pages falsely <= 1%
        e.default_alpha = NIGHT_ALPHA / len(out)
    seen: set[str] = set()
    for e in out:
        if e.name in seen:
            raise EvalsuiteError(f"{e.source}: duplicate entry name {e.name!r}; give each entry a distinct 'name'")
        seen.add(e.name)
    return out


def _check_options(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise EvalsuiteError(f"{where}: expected a mapping")
    from evalsuite.measure import parse_stages
    from evalsuite.quantize import parse_schemes

    opts: dict[str, Any] = {}
    for key, value in row.items():
        if key not in ENTRY_KEYS:
            raise EvalsuiteError(f"{where}: unknown key {key!r}; known: {', '.join(ENTRY_KEYS)}")
        types, _ = ENTRY_KEYS[key]
        if value is None:
            continue
        # a bool is an int in Python; only 'strict' may be one
        if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
            raise EvalsuiteError(f"{where}: {key} = {value!r} has the wrong type")
        if key in PATH_KEYS:
            value = os.path.expanduser(os.path.expandvars(value))
            unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value)
            if unset:
                raise EvalsuiteError(f"{where}: {key}: environment variable {unset.group(1)} is not set")
        if key in ("quant", "stages", "skip_layers") and isinstance(value, list):
            value = [str(v) for v in value]
        if key == "args" and isinstance(value, str):
            try:
                shlex.split(value)
            except ValueError as e:
                raise EvalsuiteError(f"{where}: args {value!r} does not parse as a command line ({e})") from None
        opts[key] = value
    try:
        if "stages" in opts:
            parse_stages(",".join(_as_list(opts["stages"])))
        if "quant" in opts:
            parse_schemes(",".join(_as_list(opts["quant"])))
    except EvalsuiteError as e:
        raise EvalsuiteError(f"{where}: {e}") from None
    if opts.get("nproc", 1) < 1 or opts.get("limit", 1) < 1 or opts.get("timeout_s", 1) <= 0:
        raise EvalsuiteError(f"{where}: nproc and limit must be at least 1, timeout_s positive")
    if opts.get("tp", 1) < 1 or opts.get("nproc", 1) % opts.get("tp", 1):
        raise EvalsuiteError(f"{where}: tp must be at least 1 and divide nproc ({opts.get('nproc', 1)})")
    if opts.get("device") not in (None, "auto", "cuda", "cpu"):
        raise EvalsuiteError(f"{where}: device must be auto, cuda or cpu")
    if opts.get("dtype") not in (None, "bf16", "fp16", "fp32"):
        raise EvalsuiteError(f"{where}: dtype must be bf16, fp16 or fp32")
    return opts


def _as_list(value: str | list[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    return [s.strip() for s in items if s.strip()]


def _auto_name(options: dict[str, Any]) -> str:
    model = options.get("model")
    stem = Path(model).stem if model else "default-model"
    parts = [stem, "+".join(_as_list(options.get("quant", "int8-wo"))), "+".join(_as_list(options.get("stages", "all")))]
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", "_".join(parts)).replace("+", "-")


# ---------------------------------------------------------------------------------------------
# running one entry

def run_entry(entry: Entry, entry_dir: Path, command: list[str]) -> Outcome:
    """Run one entry to completion (or its timeout) and classify what came out."""
    entry_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(entry.options.get("gates"), dict):
        import yaml

        _atomic_write(entry_dir / "gates.yaml", yaml.safe_dump(entry.options["gates"], sort_keys=False))
    results_path = entry_dir / "results.json"
    results_path.unlink(missing_ok=True)  # a stale file must not pass for this run's
    log_path = entry_dir / "run.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(_package_root()), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    timeout = entry.options.get("timeout_s")
    deadline = time.time() + timeout + WATCHDOG_SLACK_S if timeout else 0
    env[WATCHDOG_ENV] = f"{os.getpid()}:{deadline:.0f}"
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        except BaseException:  # Ctrl-C: take the entry's processes (torchrun's ranks too) down with us
            _kill_group(proc)
            raise
    seconds = round(time.perf_counter() - t0, 1)
    outcome = classify(rc, results_path, log_path, timeout)
    o = entry.options
    outcome.name, outcome.seconds, outcome.command = entry.name, seconds, command
    outcome.fingerprint, outcome.log = entry.fingerprint(command), str(log_path)
    outcome.model = o.get("model") or "(default)"
    outcome.quant = ",".join(_as_list(o.get("quant", "int8-wo")))
    outcome.stages = ",".join(_as_list(o.get("stages", "all")))
    outcome.finished = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return outcome


def _kill_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """End the entry's process group: SIGTERM (the run records where it stopped), then SIGKILL for
    whatever is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(proc.pid):
            break
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _process_alive(pid: int) -> bool:
    """``pid`` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def start_entry_watchdog() -> threading.Thread | None:
    """In a process that a nightly matrix started (``$EVALSUITE_WATCHDOG`` set): a daemon thread
    that ends this entry's process group when the matrix is gone (killed with no chance to clean
    up) or the entry's deadline has passed, so no entry is ever left running orphaned."""
    spec = os.environ.get(WATCHDOG_ENV)
    if not spec:
        return None
    try:
        matrix_pid, deadline = int(spec.split(":")[0]), float(spec.split(":")[1])
    except (ValueError, IndexError):
        return None
    thread = threading.Thread(target=_watch, args=(matrix_pid, deadline), daemon=True, name="evalsuite-watchdog")
    thread.start()
    return thread


def _watch(matrix_pid: int, deadline: float, every: float = 0.5) -> None:
    while True:
        time.sleep(every)
        if deadline and time.time() > deadline:
            why = "its timeout_s has passed"
        elif not _process_alive(matrix_pid):
            why = f"the nightly matrix (pid {matrix_pid}) that started it is gone"
        else:
            continue
        print(f"evalsuite: watchdog: ending this nightly entry: {why}", file=sys.stderr, flush=True)
        group = os.getpgrp()
        os.killpg(group, signal.SIGTERM)
        time.sleep(GRACE_S)
        os.killpg(group, signal.SIGKILL)
        return


def _package_root() -> Path:
    """The folder holding the ``evalsuite`` package, so ``python3 -m evalsuite`` works uninstalled."""
    return Path(__file__).resolve().parents[2]


def classify(rc: int | None, results_path: Path, log_path: Path, timeout: float | None) -> Outcome:
    """PASS / FAIL / ERROR from the run's exit code and its results file.

    A regression is exit code 1 *and* a failing verdict in the results; exit code 1 without one is
    a crash (Python exits 1 on an uncaught exception, e.g. a CUDA OOM)."""
    from evalsuite.judge.checks import EXIT_INCOMPLETE, EXIT_INVALID
    from evalsuite.judge.checks import exit_code as verdicts_exit_code
    from evalsuite.results import Results

    if rc is None:
        return Outcome(name="", status=ERROR, message=f"timed out after {timeout:g} s", exit_code=None)
    results = None
    if results_path.is_file():
        try:
            results = Results.load(results_path)
        except EvalsuiteError:
            results = None
    summary: dict[str, int] = {}
    failing: list[dict[str, Any]] = []
    if results is not None:
        for v in results.verdicts:
            summary[v.get("verdict", "?")] = summary.get(v.get("verdict", "?"), 0) + 1
        failing = [{k: v.get(k) for k in ("check", "verdict", "reason", "command") if v.get(k) is not None}
                   for v in results.verdicts if verdicts_exit_code([v]) == 1]
    base = dict(name="", exit_code=rc, results=str(results_path) if results is not None else None,
                verdicts=summary, failing_checks=failing)
    finished = results is not None and "finished" in results.run
    if rc == 0 and finished:
        return Outcome(status=PASS, **base)
    if rc == 1 and finished and failing:
        return Outcome(status=FAIL, message="; ".join(f["check"] for f in failing), **base)
    if rc == 0:
        return Outcome(status=ERROR, message="exited 0 but wrote no finished results.json", **base)
    if rc in (EXIT_INCOMPLETE, EXIT_INVALID) and results is not None:
        word = "INCOMPLETE" if rc == EXIT_INCOMPLETE else "INVALID"
        why = [f"{v.get('check')}: {v.get('reason')}" for v in results.verdicts if v.get("verdict") == word]
        return Outcome(status=ERROR, message=f"{word}: " + ("; ".join(why[:3]) or f"exit code {rc}"), **base)
    return Outcome(status=ERROR, message=_last_error_line(log_path) or f"exit code {rc}", **base)


def _last_error_line(log_path: Path) -> str:
    """The one line that says what went wrong: the CLI's 'evalsuite: error:' line, else a
    traceback's last line, else the log's last line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "evalsuite: error:" in ln:
            return ln.split("evalsuite: error:", 1)[1].strip()
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln):
            return ln
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# the matrix

def matrix_exit_code(outcomes: list[Outcome]) -> int:
    """1 if any entry regressed (FAIL), else 4 (INCOMPLETE) if any could not give a verdict, else 0."""
    from evalsuite.judge.checks import EXIT_INCOMPLETE, EXIT_PASSED, EXIT_REGRESSION

    statuses = {o.status for o in outcomes}
    if FAIL in statuses:
        return EXIT_REGRESSION
    if statuses & {ERROR, NOT_RUN}:
        return EXIT_INCOMPLETE
    return EXIT_PASSED


def default_out_dir(config: Path) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    return Path("reports") / "nightly" / f"{stamp}-{config.stem}"


def previous_outcome(entry_dir: Path, fingerprint: str) -> Outcome | None:
    """The recorded outcome of a finished entry whose command has not changed, else None."""
    path = entry_dir / "entry.json"
    if not path.is_file():
        return None
    try:
        outcome = Outcome.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None
    if outcome.status not in (PASS, FAIL) or outcome.fingerprint != fingerprint:
        return None
    if not outcome.results or not Path(outcome.results).is_file():
        return None
    return outcome


def _history_path(args: argparse.Namespace, data: dict[str, Any]) -> Path | None:
    if args.no_history:
        return None
    if args.history:
        return Path(args.history)
    if data.get("history"):
        return Path(os.path.expanduser(os.path.expandvars(str(data["history"]))))
    from evalsuite.judge import DEFAULT_HISTORY

    return DEFAULT_HISTORY


def main(args: argparse.Namespace) -> int:
    config = Path(args.config)
    data = load_config(config)
    entries = expand_entries(data, str(config))
    selected = {e.name for e in entries}
    if args.only:
        selected = set(_as_list(args.only))
        unknown = selected - {e.name for e in entries}
        if unknown:
            raise EvalsuiteError(f"--only: no entries named {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(e.name for e in entries)}")
    out = Path(args.out) if args.out else default_out_dir(config)
    history = _history_path(args, data)
    commands = {e.name: e.command(out / "entries" / e.name, history) for e in entries}
    if args.dry_run:
        for e in entries:
            if e.name in selected:
                print(f"# {e.name}\n{shlex.join(commands[e.name])}")
        return 0

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    outcomes: list[Outcome] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run_matrix(args, config, entries, selected, out, commands, started, outcomes)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _run_matrix(args, config, entries, selected, out, commands, started, outcomes) -> int:
    for i, e in enumerate(entries, 1):
        entry_dir = out / "entries" / e.name
        fingerprint = e.fingerprint(commands[e.name])
        prev = previous_outcome(entry_dir, fingerprint)
        if e.name not in selected:  # --only: the others keep their recorded outcome in the summary
            if prev is not None:
                prev.resumed = True
                outcomes.append(prev)
            continue
        if args.report_only:
            outcome = prev or Outcome(name=e.name, status=NOT_RUN, message="no finished outcome recorded in "
                                      f"{entry_dir} (or its command changed)", fingerprint=fingerprint)
            outcome.resumed = prev is not None
        elif prev is not None and not args.rerun:
            outcome = prev
            outcome.resumed = True
            print(f"[{i}/{len(entries)}] {e.name}: {prev.status} (finished earlier; --rerun to run again)", flush=True)
        else:
            print(f"[{i}/{len(entries)}] {e.name}: running ...", flush=True)
            try:
                outcome = run_entry(e, entry_dir, commands[e.name])
            except KeyboardInterrupt as stop:  # the entry's processes are ended; say so, then stop
                outcome = Outcome(name=e.name, status=ERROR, message=f"matrix interrupted by {signal_name(stop)}",
                                  command=commands[e.name], log=str(entry_dir / "run.log"))
                _atomic_write(entry_dir / "entry.json", json.dumps(outcome.to_dict(), indent=1) + "\n")
                outcomes.append(outcome)
                write_summary(out, config, started, outcomes, entries)
                print(f"[{i}/{len(entries)}] {e.name}: ERROR: {outcome.message}; summary: {out / 'summary.md'}",
                      flush=True)
                raise
            _atomic_write(entry_dir / "entry.json", json.dumps(outcome.to_dict(), indent=1) + "\n")
            tail = f": {outcome.message}" if outcome.message else ""
            print(f"[{i}/{len(entries)}] {e.name}: {outcome.status} in {outcome.seconds:g} s{tail}", flush=True)
        outcomes.append(outcome)
        if not args.report_only:
            write_summary(out, config, started, outcomes, entries)
    code = write_summary(out, config, started, outcomes, entries)
    print()
    print(render_summary(outcomes))
    print(f"\nmatrix: {sum(o.status == PASS for o in outcomes)}/{len(outcomes)} PASS; exit code {code}; "
          f"summary: {out / 'summary.md'}, {out / 'junit.xml'}")
    return code


# ---------------------------------------------------------------------------------------------
# summary

def write_summary(out: Path, config: Path, started: str, outcomes: list[Outcome], entries: list[Entry]) -> int:
    """summary.json, summary.md and junit.xml for the entries done so far; entries not reached yet
    are listed as pending in the JSON, so an interrupted matrix says how far it got."""
    out.mkdir(parents=True, exist_ok=True)
    done = {o.name for o in outcomes}
    code = matrix_exit_code(outcomes)
    summary = {
        "schema": SCHEMA,
        "config": str(config.resolve()),
        "started": started,
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "exit_code": code,
        "counts": {s: sum(o.status == s for o in outcomes) for s in (PASS, FAIL, ERROR, NOT_RUN)},
        "entries": [o.to_dict() for o in outcomes],
        "pending": [e.name for e in entries if e.name not in done],
    }
    _atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    _atomic_write(out / "summary.md", render_markdown(outcomes, summary))
    _atomic_write(out / "junit.xml", render_junit(outcomes))
    return code


def _atomic_write(path: Path, text: str) -> None:
    from evalsuite.results import write_text_atomic

    write_text_atomic(path, text)


def _rows(outcomes: list[Outcome]) -> list[list[Any]]:
    rows = []
    for o in outcomes:
        checks = ", ".join(f"{n} {v}" for v, n in sorted(o.verdicts.items())) or "-"
        detail = o.message + (" (earlier run)" if o.resumed else "")
        rows.append([o.name, o.model and Path(o.model).name, o.quant, o.stages, o.status,
                     "-" if o.seconds is None else f"{o.seconds:g}", checks, detail])
    return rows


HEADERS = ["entry", "model", "quant", "stages", "status", "seconds", "checks", "detail"]


def render_summary(outcomes: list[Outcome], tablefmt: str = "simple") -> str:
    from tabulate import tabulate

    return tabulate(_rows(outcomes), headers=HEADERS, tablefmt=tablefmt) if outcomes else "(no entries)"


def render_markdown(outcomes: list[Outcome], summary: dict[str, Any]) -> str:
    verdict = {0: "PASS", 1: "FAIL (regression)", 4: "INCOMPLETE (an entry could not give a verdict)"}.get(
        summary["exit_code"], f"exit code {summary['exit_code']}")
    lines = [f"# Nightly matrix: {verdict}", "", f"config `{summary['config']}`, started {summary['started']}, "
             f"updated {summary['updated']}", "", render_summary(outcomes, "github"), ""]
    failing = [(o.name, c) for o in outcomes for c in o.failing_checks]
    if failing:
        lines += ["## Failing checks", ""]
        for name, c in failing:
            lines.append(f"- **{name}** `{c.get('check')}`: {c.get('reason', '')}")
            if c.get("command"):
                lines.append(f"  - update the baseline if intended: `{c['command']}`")
        lines.append("")
    if summary["pending"]:
        lines += [f"Not reached yet: {', '.join(summary['pending'])}", ""]
    return "\n".join(lines)


def render_junit(outcomes: list[Outcome]) -> str:
    """One test case per entry (failure = regression, error = no verdict) and one per failing
    check, so a CI system lists the matrix natively (the run's own JUnit writer)."""
    from evalsuite.report.junit import Case, junit_xml

    cases = []
    for o in outcomes:
        outcome = "failure" if o.status == FAIL else "error" if o.status in (ERROR, NOT_RUN) else "pass"
        message = (o.message or "regression") if o.status == FAIL else f"{o.status}: {o.message}"
        cases.append(Case("nightly", o.name, outcome, message, text=o.log or "", time=o.seconds or 0))
        cases += [Case(f"nightly.{o.name}", str(c.get("check")), "failure", str(c.get("reason", "")),
                       text=c.get("command") or "") for c in o.failing_checks]
    return junit_xml("evalsuite.commands.nightly", cases)
