"""The user's own handler: ``--quant path/to/file.py:Name`` or ``--quant package.module:Name``.

**This runs the user's code**: the file or module is imported (executing its top level) when the
spec is parsed, before the model loads, and its handler runs on the model. Only point ``--quant``
at code you would run yourself. A file's folder is on ``sys.path`` while it is imported, so it
can import its siblings as ``python file.py`` would.

``Name`` is either

* a class with gpt-fast's protocol, used exactly as gpt-fast uses it::

      handler = Name(model, **kwargs)
      state_dict = handler.create_quantized_state_dict()
      model = handler.convert_for_runtime()        # or None: the model was converted in place
      model.load_state_dict(state_dict, assign=True)

* or a function ``Name(model, **kwargs) -> model`` (torchao's ``quantize_`` shape): it quantizes in
  place (returning None) or returns the new module; any other return value is an error.

The handler runs in evalsuite's own process. Whatever it raises, ``SystemExit`` (``sys.exit()``) and
a ``KeyboardInterrupt`` of its own included, becomes one line naming the handler (exit 2, the
results so far kept); only a real Ctrl-C or SIGTERM still stops the run as one. ``timeout_s``
(``--handler-timeout``) bounds its import and its run, through SIGALRM: pure Python is stopped at
once, a long native call (one big matmul) when it returns.

If the class or function takes a keyword ``filter_fn`` (torchao's name), it is given
``filter_fn(module, fqn) -> bool`` selecting the linear layers evalsuite's policy would quantize
(output head excluded unless ``+head``; ``--skip-layers`` honoured). A handler without it picks its
own layers, and ``--skip-layers`` or ``+head`` is refused for it rather than silently ignored.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from evalsuite.errors import EvalsuiteError, Interrupted, first_line
from evalsuite.quantize.policy import LayerPolicy
from evalsuite.quantize.spec import Reference, ReferencedScheme

HANDLER_METHODS = ("create_quantized_state_dict", "convert_for_runtime")
_IMPORTED: dict[str, Any] = {}  # file or module → imported module: importing runs user code, once


@dataclass(frozen=True)
class UserHandlerConfig(ReferencedScheme):
    """A handler by reference; ``kind`` is ``"class"`` (gpt-fast protocol) or ``"function"``."""

    kind: str
    takes_filter: bool
    timeout_s: float | None = None  # --handler-timeout: the most seconds its import or its run may take

    @property
    def include_head(self) -> bool | None:
        """The head policy where evalsuite's filter applies; None where the handler picks its layers."""
        return self.ref.include_head if self.takes_filter else None


class _HandlerTimeout(BaseException):
    """Raised by SIGALRM inside the user's code; a BaseException, so its own ``except Exception`` does not swallow it."""


def run_user_code(where: str, call: Callable[[], Any], timeout_s: float | None = None) -> Any:
    """``call()``, which runs the user's code; anything it raises or any way it tries to end the
    process (``sys.exit``) becomes one ``EvalsuiteError`` line starting with ``where``. A
    ``KeyboardInterrupt`` is passed on only where a real SIGINT (or our SIGTERM/SIGHUP) caused it."""
    in_main = threading.current_thread() is threading.main_thread()
    if timeout_s is not None and not (in_main and hasattr(signal, "setitimer")):
        raise EvalsuiteError(f"{where}: --handler-timeout needs the main thread of a POSIX process")
    signalled: list[int] = []
    previous: dict[int, Any] = {}
    # a Ctrl-C is told from the handler's own KeyboardInterrupt by a SIGINT handler that notes it; where
    # SIGINT has another handler already, a KeyboardInterrupt counts as real unless SIGINT is ignored
    sigint = signal.getsignal(signal.SIGINT)
    real_sigint = in_main and sigint not in (signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler)
    if in_main:
        def on_sigint(signum, frame):
            signalled.append(signum)
            raise KeyboardInterrupt

        def on_alarm(signum, frame):
            raise _HandlerTimeout

        if sigint is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
        if timeout_s is not None:
            previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return call()
    except EvalsuiteError:
        raise
    except _HandlerTimeout:
        raise EvalsuiteError(f"{where} did not finish within --handler-timeout {timeout_s:g} s") from None
    except KeyboardInterrupt as e:
        if signalled or real_sigint or isinstance(e, Interrupted):
            raise
        raise EvalsuiteError(f"{where} raised KeyboardInterrupt (not a Ctrl-C: the handler's own)") from None
    except SystemExit as e:
        raise EvalsuiteError(f"{where} called sys.exit({e.code!r}); a handler must return, not end the "
                             "process") from None
    except BaseException as e:
        raise EvalsuiteError(f"{where} raised {type(e).__name__}: {first_line(e)}") from None
    finally:
        if in_main:
            if timeout_s is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _import_source(ref: Reference, timeout_s: float | None = None):
    key = str(Path(ref.source).resolve()) if ref.is_file else ref.source
    if key in _IMPORTED:
        return _IMPORTED[key]
    where = f"--quant {ref.text}"
    if ref.is_file:
        path = Path(ref.source)
        if not path.is_file():
            raise EvalsuiteError(f"{where}: {path}: no such file")
        mod_name = f"evalsuite_user_{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look classes up here
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)
        try:
            run_user_code(f"{where}: importing {path}", lambda: spec.loader.exec_module(module), timeout_s)
        except EvalsuiteError:
            sys.modules.pop(mod_name, None)
            raise
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    else:
        def import_module():
            try:
                return importlib.import_module(ref.source)
            except ModuleNotFoundError as e:
                if e.name and ref.source.startswith(e.name):
                    raise EvalsuiteError(f"{where}: no module named {ref.source!r} (not installed, or not on "
                                         f"PYTHONPATH)") from None
                raise

        module = run_user_code(f"{where}: importing {ref.source}", import_module, timeout_s)
    _IMPORTED[key] = module
    return module


def resolve(ref: Reference, timeout_s: float | None = None) -> Any:
    """The object ``ref`` names; imports (runs) the file or module the first time."""
    obj = _import_source(ref, timeout_s)
    for part in ref.attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(_import_source(ref)).items() if not n.startswith("_") and callable(v))
            raise EvalsuiteError(f"--quant {ref.text}: {ref.source} has no attribute {ref.attr!r}"
                                 f" (it has: {', '.join(public[:12]) or 'nothing callable'})")
        obj = getattr(obj, part)
    return obj


def make_config(ref: Reference, label: str, skip: tuple[str, ...],
                timeout_s: float | None = None) -> UserHandlerConfig:
    """Check ``ref`` names a usable handler and that its keywords bind, before any model loads."""
    target = resolve(ref, timeout_s)
    where = f"--quant {ref.text}"
    if inspect.isclass(target):
        missing = [m for m in HANDLER_METHODS if not callable(getattr(target, m, None))]
        if missing:
            raise EvalsuiteError(f"{where}: class {ref.attr} lacks {' and '.join(m + '()' for m in missing)}; a handler "
                                 f"class needs create_quantized_state_dict() and convert_for_runtime() (gpt-fast's "
                                 f"protocol), else give a function fn(model) -> model")
        kind = "class"
    elif callable(target):
        kind = "function"
    else:
        raise EvalsuiteError(f"{where}: {ref.attr} is of type {type(target).__name__!r}, not a handler class or function")
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        sig = None
    takes_filter = sig is not None and "filter_fn" in sig.parameters
    if sig is not None:
        try:
            sig.bind(None, **dict(ref.kwargs))
        except TypeError as e:
            raise EvalsuiteError(f"{where}: {ref.attr}{sig} does not accept these arguments ({e})") from None
    for asked, what in ((skip, "--skip-layers"), (ref.include_head, "+head")):
        if asked and not takes_filter:
            raise EvalsuiteError(f"{where}: {what} cannot apply: {ref.attr} takes no filter_fn keyword, so it "
                                 f"chooses its own layers")
    return UserHandlerConfig(ref=ref, label=label, kind=kind, takes_filter=takes_filter, timeout_s=timeout_s)


def policy_filter(model: nn.Module, policy: LayerPolicy) -> Callable[[nn.Module, str], bool]:
    """torchao's ``filter_fn(module, fqn)``: True for the layers ``policy`` selects in ``model``."""
    chosen = set(policy.select(model))
    return lambda module, fqn: fqn in chosen


def _module_or_none(returned: Any, where: str, what: str) -> nn.Module | None:
    """A handler's result: a module, or None for "converted in place"; anything else is its bug (a
    stray ``return 42`` must not pass as "quantized in place")."""
    if returned is None or isinstance(returned, nn.Module):
        return returned
    raise EvalsuiteError(f"{where}: {what} returned a value of type {type(returned).__name__!r}; it must return the model "
                         "(an nn.Module) or None (converted in place)")


def apply(model: nn.Module, config: UserHandlerConfig, policy: LayerPolicy) -> nn.Module:
    """Run the user's handler on ``model``; anything it raises, or returns that is not a model, becomes
    one line naming it."""
    target = resolve(config.ref, config.timeout_s)
    kwargs = dict(config.ref.kwargs)
    if config.takes_filter:
        kwargs["filter_fn"] = policy_filter(model, policy)
    where = f"handler {config.name} ({config.spec})"

    def run_class() -> tuple[Any, Any]:
        handler = target(model, **kwargs)
        state_dict = handler.create_quantized_state_dict()
        return state_dict, handler.convert_for_runtime()

    if config.kind == "class":
        state_dict, converted = run_user_code(where, run_class, config.timeout_s)
        out = _module_or_none(converted, where, f"{config.ref.attr}.convert_for_runtime()") or model
        run_user_code(where, lambda: out.load_state_dict(state_dict, assign=True))
    else:
        returned = run_user_code(where, lambda: target(model, **kwargs), config.timeout_s)
        out = _module_or_none(returned, where, f"{config.ref.attr}()") or model
    return out
