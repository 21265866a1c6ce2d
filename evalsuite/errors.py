"""The one exception type for errors a user can cause, and the one place that recognises library
exceptions a user can cause.

The CLI turns an ``EvalsuiteError`` into a single line on stderr and exit code 2, with no traceback.
``user_error`` maps the library exceptions that stand for a user's mistake (a truncated safetensors
file, a config.json of the wrong types, a pickle that ``weights_only`` refused, an ``--out`` that is
a file, read-only or full) to one; anything else stays a bug (exit 3, traceback).
"""

from __future__ import annotations

import errno
import signal


class EvalsuiteError(Exception):
    """Bad path, bad file, unknown name, empty data: anything the user can fix."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt, so a run
    records where it stopped and ``finally`` blocks (locks, child processes) run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(e: BaseException) -> str:
    return signal.Signals(e.signum).name if isinstance(e, Interrupted) else "SIGINT"


def raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


# OS errors that say something about the user's paths or disk, not about evalsuite
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
               errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}


def first_line(e: BaseException, limit: int = 300) -> str:
    """The gist of an exception in one line, for a one-line error message. Libraries' messages can
    be empty (then the type's name) or put the gist on the second line after a "...:" header (torch's
    state-dict errors), which is then joined on."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0] if len(lines) == 1 or not lines[0].endswith(":") else f"{lines[0]} {lines[1]}"
    return text[:limit]


def _is(e: BaseException, module_prefix: str, *names: str) -> bool:
    """``e`` is (a subclass of) a class called one of ``names`` from a module under
    ``module_prefix``, matched by name so that the library need not be imported."""
    return any(c.__module__.startswith(module_prefix) and c.__name__ in names for c in type(e).__mro__)


def user_error(e: BaseException, where: str | None = None) -> EvalsuiteError | None:
    """The one-line user error that a library exception stands for, or None when it is a bug.
    ``where`` names the file or option involved (the exception's own file name is used for OS
    errors)."""
    import pickle

    prefix = f"{where}: " if where else ""
    if isinstance(e, EvalsuiteError):
        return e
    if _is(e, "safetensors", "SafetensorError"):
        return EvalsuiteError(f"{prefix}not a readable safetensors file ({first_line(e)})")
    if _is(e, "huggingface_hub", "StrictDataclassError") or _is(e, "pydantic", "ValidationError"):
        return EvalsuiteError(f"{prefix}invalid model config ({first_line(e)})")
    if isinstance(e, pickle.UnpicklingError):
        return EvalsuiteError(f"{prefix}refused to unpickle the checkpoint: it holds objects other than tensors, "
                              f"and loading those would run code from the file ({first_line(e, 160)})")
    if isinstance(e, (UnicodeDecodeError,)):
        return EvalsuiteError(f"{prefix}not a text file ({first_line(e)})")
    if isinstance(e, OSError) and e.errno in USER_ERRNOS:
        target = e.filename or where
        return EvalsuiteError(f"{target + ': ' if target else ''}{e.strerror or first_line(e)}")
    return None
