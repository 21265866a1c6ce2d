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
  place (returning None) or returns the new module.

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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from evalsuite.errors import EvalsuiteError, first_line
from evalsuite.quantize.policy import LayerPolicy
from evalsuite.quantize.spec import Reference, ReferencedScheme

HANDLER_METHODS = ("create_quantized_state_dict", "convert_for_runtime")
_IMPORTED: dict[str, Any] = {}  # file or module → imported module: importing runs user code, once


@dataclass(frozen=True)
class UserHandlerConfig(ReferencedScheme):
    """A handler by reference; ``kind`` is ``"class"`` (gpt-fast protocol) or ``"function"``."""

    kind: str
    takes_filter: bool

    @property
    def include_head(self) -> bool | None:
        """The head policy where evalsuite's filter applies; None where the handler picks its layers."""
        return self.ref.include_head if self.takes_filter else None


def _import_source(ref: Reference):
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
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise EvalsuiteError(f"{where}: importing {path} failed ({type(e).__name__}: {first_line(e)})") from None
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    else:
        try:
            module = importlib.import_module(ref.source)
        except ModuleNotFoundError as e:
            if e.name and ref.source.startswith(e.name):
                raise EvalsuiteError(f"{where}: no module named {ref.source!r} (not installed, or not on "
                                     f"PYTHONPATH)") from None
            raise EvalsuiteError(f"{where}: importing {ref.source} failed (ModuleNotFoundError: {first_line(e)})") from None
        except Exception as e:
            raise EvalsuiteError(f"{where}: importing {ref.source} failed ({type(e).__name__}: {first_line(e)})") from None
    _IMPORTED[key] = module
    return module


def resolve(ref: Reference) -> Any:
    """The object ``ref`` names; imports (runs) the file or module the first time."""
    obj = _import_source(ref)
    for part in ref.attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(_import_source(ref)).items() if not n.startswith("_") and callable(v))
            raise EvalsuiteError(f"--quant {ref.text}: {ref.source} has no attribute {ref.attr!r}"
                                 f" (it has: {', '.join(public[:12]) or 'nothing callable'})")
        obj = getattr(obj, part)
    return obj


def make_config(ref: Reference, label: str, skip: tuple[str, ...]) -> UserHandlerConfig:
    """Check ``ref`` names a usable handler and that its keywords bind, before any model loads."""
    target = resolve(ref)
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
    return UserHandlerConfig(ref=ref, label=label, kind=kind, takes_filter=takes_filter)


def policy_filter(model: nn.Module, policy: LayerPolicy) -> Callable[[nn.Module, str], bool]:
    """torchao's ``filter_fn(module, fqn)``: True for the layers ``policy`` selects in ``model``."""
    chosen = set(policy.select(model))
    return lambda module, fqn: fqn in chosen


def apply(model: nn.Module, config: UserHandlerConfig, policy: LayerPolicy) -> nn.Module:
    """Run the user's handler on ``model``; any exception it raises becomes one line naming it."""
    target = resolve(config.ref)
    kwargs = dict(config.ref.kwargs)
    if config.takes_filter:
        kwargs["filter_fn"] = policy_filter(model, policy)
    try:
        if config.kind == "class":
            handler = target(model, **kwargs)
            state_dict = handler.create_quantized_state_dict()
            converted = handler.convert_for_runtime()
            out = converted if isinstance(converted, nn.Module) else model
            out.load_state_dict(state_dict, assign=True)
        else:
            returned = target(model, **kwargs)
            out = returned if isinstance(returned, nn.Module) else model
    except EvalsuiteError:
        raise
    except Exception as e:
        raise EvalsuiteError(f"handler {config.name} ({config.spec}) raised {type(e).__name__}: {first_line(e)}") from None
    return out
