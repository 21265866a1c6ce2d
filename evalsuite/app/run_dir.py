"""A run's ``--out`` folder: one process at a time, and never over another run's results unless told.

- A lock file (``.evalsuite.lock``, holding the owner's PID and host) is held with ``flock`` for the
  whole run: a second ``evalsuite run`` on the same folder is refused with the owner's PID. The
  kernel drops the lock when its process dies, so a lock left by a killed run is stale by
  construction and is taken over (the PID in it is only for the message).
- An ``--out`` that cannot be created or written is one line, exit 2; one that goes away or refuses
  writes mid-run stops the run, and the results so far are saved under the system temp dir
  (``rescue_dir``), the error line saying where.
- A folder that holds a previous run's measurements (``results.json`` with records) is refused unless ``--resume`` (finish the
  stages it did not finish, keeping its records) or ``--force`` (replace it: its results and reports
  are removed first, so no old figure stays beside a new report).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from evalsuite.errors import EvalsuiteError

log = logging.getLogger(__name__)

LOCK_NAME = ".evalsuite.lock"
# what a run writes into its folder; --force removes exactly these
RUN_FILES = ("results.json", "report.md", "report.html", "junit.xml")
RUN_DIRS = ("figures",)


class OutDirLock:
    """An exclusive lock on ``out_dir`` for this process; ``release`` (or process death) frees it."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "OutDirLock":
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise EvalsuiteError(f"--out {self.path.parent}: another evalsuite run ({owner}) is writing this "
                                     "folder; wait for it or choose another --out") from None
            except OSError as e:  # a file system without locks (some network mounts): run unlocked
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                log.warning("--out %s: this file system has no file locks; not guarding it against a second run",
                            self.path.parent)
                self.fd = fd
                return self
            # the file may have been unlinked by its releasing owner between our open and flock
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise EvalsuiteError(f"--out {self.path.parent}: could not take the lock {self.path}")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # its folder went away or became a file: nothing left to unlink
            pass
        finally:
            os.close(self.fd)
            self.fd = None


def rescue_dir(out_dir: Path) -> Path:
    """A fresh folder under the system temp dir for a run's results once ``out_dir`` cannot take them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"evalsuite-rescued-{stamp}-{Path(out_dir).name or 'run'}-"))


def _read_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {owner.get('pid')} on {owner.get('host')}"
    except (OSError, ValueError):
        return "pid unknown"


def _holds_measurements(path: Path) -> bool:
    """A results file with records or verdicts (a run that failed while loading has none, and is
    replaced without asking); an unreadable one counts as holding something."""
    from evalsuite.results import Results

    try:
        previous = Results.load(path)
    except EvalsuiteError:
        return True
    return bool(previous.records or previous.verdicts)


def claim(out_dir: Path, resume: bool = False, force: bool = False) -> tuple[OutDirLock, Path | None]:
    """Create ``out_dir``, lock it, and decide what to do with a previous run in it.

    Returns the lock and the previous results file to resume from (None for a fresh run)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalsuiteError(f"--out {out_dir}: is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = OutDirLock(out_dir).acquire()
    except OSError as e:  # read-only, full, or a place no folder can be made (/proc/x): nothing ran yet
        raise EvalsuiteError(f"--out {out_dir}: cannot write there ({e.strerror or e})") from None
    try:
        previous = out_dir / "results.json"
        if not previous.is_file():
            return lock, None
        if resume:
            return lock, previous
        if not force and _holds_measurements(previous):
            raise EvalsuiteError(f"--out {out_dir} holds a previous run's results.json; pass --resume to finish its "
                                 "missing stages or --force to replace it, or choose another --out")
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(out_dir / name, ignore_errors=True)
        return lock, None
    except BaseException:
        lock.release()
        raise
