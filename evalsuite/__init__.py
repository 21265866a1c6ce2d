"""evalsuite: quantization accuracy and regression suite for causal language models.

Python API (imported on first use, so ``import evalsuite`` stays cheap): :func:`evaluate`,
:func:`quantize` (``evalsuite.quantize(model, "int8-wo")``), :class:`Results` (``.table()``,
``.gate(baselines)``). See the README's "Python API".
"""

import os

# Before torch is imported: OpenMP's busy-waiting threads stall when a core is shared (a 2-core CI
# machine running other work decoded SmolLM2 16x slower on 2 threads than on 1); passive waiting
# costs little where the cores are free. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from evalsuite.versions import __version__  # noqa: E402
__all__ = ["evaluate", "quantize", "Results", "EvalsuiteError"]


def __getattr__(name: str):
    if name == "evaluate":
        from evalsuite.commands.api import evaluate

        return evaluate
    if name == "quantize":  # the stage package, callable as the API function (see its __init__)
        import evalsuite.quantize as quantize

        return quantize
    if name == "Results":
        from evalsuite.commands.api import Results

        return Results
    if name == "EvalsuiteError":
        from evalsuite.errors import EvalsuiteError

        return EvalsuiteError
    raise AttributeError(f"module 'evalsuite' has no attribute {name!r}")
