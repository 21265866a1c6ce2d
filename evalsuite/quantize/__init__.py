"""Stage 2 of the pipeline: quantize. One file per scheme, a registry maps configs to handlers."""

from evalsuite.quantize.base import QuantHandler, QuantizedLinear
from evalsuite.quantize.fp8_dq import (
    Float8DynActFloat8WeightLinear,
    Float8DynActFloat8WeightQuantHandler,
    Float8DynamicActivationFloat8WeightConfig,
)
from evalsuite.quantize.fp8_wo import Float8WeightOnlyConfig, WeightOnlyFloat8Linear, WeightOnlyFloat8QuantHandler
from evalsuite.quantize.int4_wo import Int4WeightOnlyConfig, WeightOnlyInt4Linear, WeightOnlyInt4QuantHandler
from evalsuite.quantize.int8_dq import (
    Int8DynActInt8WeightLinear,
    Int8DynActInt8WeightQuantHandler,
    Int8DynamicActivationInt8WeightConfig,
)
from evalsuite.quantize.int8_wo import Int8WeightOnlyConfig, WeightOnlyInt8Linear, WeightOnlyInt8QuantHandler
from evalsuite.quantize.policy import LayerPolicy, output_head_name
from evalsuite.quantize.registry import known_schemes, make_handler, parse_scheme, parse_schemes, quantize_, register

__all__ = [
    "Float8DynActFloat8WeightLinear", "Float8DynActFloat8WeightQuantHandler",
    "Float8DynamicActivationFloat8WeightConfig", "Float8WeightOnlyConfig", "WeightOnlyFloat8Linear",
    "WeightOnlyFloat8QuantHandler",
    "Int4WeightOnlyConfig", "Int8DynActInt8WeightLinear", "Int8DynActInt8WeightQuantHandler",
    "Int8DynamicActivationInt8WeightConfig", "Int8WeightOnlyConfig", "LayerPolicy", "QuantHandler",
    "QuantizedLinear", "WeightOnlyInt4Linear", "WeightOnlyInt4QuantHandler", "WeightOnlyInt8Linear",
    "WeightOnlyInt8QuantHandler", "known_schemes", "make_handler", "output_head_name", "parse_scheme",
    "parse_schemes", "quantize_", "register",
]


class _CallableStage(__import__("types").ModuleType):
    """``evalsuite.quantize(model, "int8-wo")``: this package is also the API's quantize function
    (the name is both, whichever Python resolves first)."""

    def __call__(self, model, scheme: str, *, skip=(), inplace: bool = False):
        return quantize(model, scheme, skip=skip, inplace=inplace)


def quantize(model, scheme: str, *, skip=(), inplace: bool = False):
    """``model`` quantized with ``scheme`` (a name as ``--quant`` takes, e.g. ``"int8-wo"``,
    ``"int4-wo-g128"``); a copy unless ``inplace``, so the original stays the fp reference.
    ``skip``: fnmatch patterns of linear layers kept in floating point."""
    import copy

    return quantize_(model if inplace else copy.deepcopy(model), parse_scheme(scheme), skip=tuple(skip))


__import__("sys").modules[__name__].__class__ = _CallableStage
