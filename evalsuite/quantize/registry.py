"""Scheme names → config objects → transforms (torchao's verb-config-registry shape).

A new scheme is a new file plus one ``register`` call here; nothing else changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from evalsuite.errors import EvalsuiteError
from evalsuite.quantize.base import QuantHandler
from evalsuite.quantize.int4_wo import GROUP_SIZES, Int4WeightOnlyConfig, WeightOnlyInt4QuantHandler
from evalsuite.quantize.int8_dq import Int8DynActInt8WeightQuantHandler, Int8DynamicActivationInt8WeightConfig
from evalsuite.quantize.int8_wo import Int8WeightOnlyConfig, WeightOnlyInt8QuantHandler
from evalsuite.quantize.policy import LayerPolicy


@dataclass(frozen=True)
class Scheme:
    pattern: str  # regex over the scheme name, without the optional "+head" suffix
    example: str
    make_config: Callable[[re.Match, bool], object]
    make_handler: Callable[[nn.Module, object, LayerPolicy], QuantHandler]
    description: str


_SCHEMES: dict[type, Scheme] = {}


def register(config_type: type, scheme: Scheme) -> None:
    _SCHEMES[config_type] = scheme


register(Int8WeightOnlyConfig, Scheme(
    r"int8-wo", "int8-wo",
    lambda m, head: Int8WeightOnlyConfig(include_head=head),
    lambda mod, cfg, pol: WeightOnlyInt8QuantHandler(mod, pol),
    "weight-only int8, symmetric per output channel (gpt-fast seed)",
))
register(Int4WeightOnlyConfig, Scheme(
    r"int4-wo-g(\d+)", "int4-wo-g128",
    lambda m, head: Int4WeightOnlyConfig(group_size=int(m.group(1)), include_head=head),
    lambda mod, cfg, pol: WeightOnlyInt4QuantHandler(mod, cfg.group_size, pol),
    f"weight-only int4, asymmetric per group of {'/'.join(map(str, GROUP_SIZES))} input columns",
))
register(Int8DynamicActivationInt8WeightConfig, Scheme(
    r"int8-dq", "int8-dq",
    lambda m, head: Int8DynamicActivationInt8WeightConfig(include_head=head),
    lambda mod, cfg, pol: Int8DynActInt8WeightQuantHandler(mod, pol),
    "dynamic per-token int8 activations x per-channel int8 weights",
))


def known_schemes() -> list[str]:
    names = []
    for s in _SCHEMES.values():
        if "(\\d+)" in s.pattern:
            names += [s.pattern.replace("(\\d+)", str(g)) for g in GROUP_SIZES]
        else:
            names.append(s.pattern)
    return names


def parse_scheme(name: str) -> object:
    """``int8-wo`` → Int8WeightOnlyConfig(); a ``+head`` suffix also quantizes the output head."""
    base, head = (name[: -len("+head")], True) if name.endswith("+head") else (name, False)
    for scheme in _SCHEMES.values():
        m = re.fullmatch(scheme.pattern, base)
        if m:
            try:
                return scheme.make_config(m, head)
            except ValueError:
                break
    raise EvalsuiteError(
        f"unknown quantization scheme {name!r}; known: {', '.join(known_schemes())} (append +head to include the output head)"
    )


def parse_schemes(spec: str) -> list[object]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise EvalsuiteError("--quant needs at least one scheme name")
    configs = [parse_scheme(n) for n in names]
    seen = set()
    for c in configs:
        if c.name in seen:
            raise EvalsuiteError(f"scheme {c.name!r} is given twice in --quant")
        seen.add(c.name)
    return configs


def make_handler(model: nn.Module, config: object, skip: tuple[str, ...] = ()) -> QuantHandler:
    scheme = _SCHEMES.get(type(config))
    if scheme is None:
        raise EvalsuiteError(f"no quantization scheme is registered for {type(config).__name__}")
    policy = LayerPolicy(include_head=config.include_head, skip=skip)
    return scheme.make_handler(model, config, policy)


def quantize_(model: nn.Module, config: object, skip: tuple[str, ...] = ()) -> nn.Module:
    """Quantize ``model`` in place with the scheme of ``config``; returns the model."""
    handler = make_handler(model, config, skip)
    state_dict = handler.create_quantized_state_dict()
    handler.convert_for_runtime()
    model.load_state_dict(state_dict, assign=True)
    return model
