"""Scheme names → config objects → transforms (torchao's verb-config-registry shape).

A new scheme is a new file plus one ``register`` call here; nothing else changes. Besides the
built-in names, ``--quant`` takes the user's own quantization by reference (``FILE.py:Name``,
``package.module:Name``, ``torchao:Config``, each with optional ``(keyword=literal, ...)`` and
``+head``), and ``NAME=SPEC`` names any variant; those parse into configs too (``user``,
``torchao_config``), which ``register_transform`` maps to the function that applies them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from evalsuite.errors import EvalsuiteError
from evalsuite.quantize.base import QuantHandler
from evalsuite.quantize.fp8_dq import (
    Float8DynActFloat8WeightQuantHandler,
    Float8DynamicActivationFloat8WeightConfig,
    forward_paths,
)
from evalsuite.quantize.fp8_wo import Float8WeightOnlyConfig, WeightOnlyFloat8QuantHandler
from evalsuite.quantize.int4_wo import GROUP_SIZES, Int4WeightOnlyConfig, WeightOnlyInt4QuantHandler
from evalsuite.quantize.int8_dq import Int8DynActInt8WeightQuantHandler, Int8DynamicActivationInt8WeightConfig
from evalsuite.quantize.int8_wo import Int8WeightOnlyConfig, WeightOnlyInt8QuantHandler
from evalsuite.quantize import recipe, torchao_config, user
from evalsuite.quantize.policy import LayerPolicy
from evalsuite.quantize.spec import parse_reference, split_name, split_top_level


@dataclass(frozen=True)
class Scheme:
    pattern: str  # regex over the scheme name, without the optional "+head" suffix
    example: str
    make_config: Callable[[re.Match, bool], object]
    make_handler: Callable[[nn.Module, object, LayerPolicy], QuantHandler]
    description: str
    names: tuple[str, ...] = ()  # the concrete names the pattern accepts, where it has alternatives


_SCHEMES: dict[type, Scheme] = {}
# config type → fn(model, config, policy) -> model, for configs that are not a built-in handler
_TRANSFORMS: dict[type, Callable[[nn.Module, object, LayerPolicy], nn.Module]] = {}


def register(config_type: type, scheme: Scheme) -> None:
    _SCHEMES[config_type] = scheme


def register_transform(config_type: type, transform: Callable[[nn.Module, object, LayerPolicy], nn.Module]) -> None:
    _TRANSFORMS[config_type] = transform


register_transform(user.UserHandlerConfig, user.apply)
register_transform(torchao_config.TorchaoConfig, torchao_config.apply)
register_transform(recipe.RecipeConfig, recipe.apply)


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
register(Float8WeightOnlyConfig, Scheme(
    r"fp8-wo", "fp8-wo",
    lambda m, head: Float8WeightOnlyConfig(include_head=head),
    lambda mod, cfg, pol: WeightOnlyFloat8QuantHandler(mod, pol),
    "weight-only float8 e4m3, symmetric per output channel",
))
register(Float8DynamicActivationFloat8WeightConfig, Scheme(
    r"fp8-dq(?:-(tensor))?", "fp8-dq",
    lambda m, head: Float8DynamicActivationFloat8WeightConfig(granularity=m.group(1) or "row", include_head=head),
    lambda mod, cfg, pol: Float8DynActFloat8WeightQuantHandler(mod, cfg.granularity, pol),
    "dynamic per-token float8 e4m3 activations x per-channel e4m3 weights (fp8-dq-tensor: per tensor); "
    "torch._scaled_mm on CUDA >= sm89, else emulated",
    names=("fp8-dq", "fp8-dq-tensor"),
))


def known_schemes() -> list[str]:
    names = []
    for s in _SCHEMES.values():
        if s.names:
            names += s.names
        elif "(\\d+)" in s.pattern:
            names += [s.pattern.replace("(\\d+)", str(g)) for g in GROUP_SIZES]
        else:
            names.append(s.pattern)
    return names


def parse_scheme(spec: str, skip: tuple[str, ...] = (), handler_timeout: float | None = None) -> object:
    """One ``--quant`` entry → its config. ``int8-wo`` → Int8WeightOnlyConfig(); ``+head`` also
    quantizes the output head; ``NAME=`` names the variant; ``FILE.py:X`` / ``module:X`` import the
    user's code (see ``user``; ``handler_timeout`` bounds it), ``torchao:Config`` builds torchao's config."""
    label, body = split_name(spec)
    if recipe.is_recipe(body):
        return recipe.load(body[len(recipe.PREFIX):], label)
    ref = parse_reference(body)
    if ref is not None:
        label = label or ref.default_name()
        if ref.source == "torchao":
            return torchao_config.make_config(ref, label)
        return user.make_config(ref, label, skip, handler_timeout)
    config = _parse_builtin(body)
    return dataclasses.replace(config, label=label) if label else config


def _parse_builtin(name: str) -> object:
    base, head = (name[: -len("+head")], True) if name.endswith("+head") else (name, False)
    for scheme in _SCHEMES.values():
        m = re.fullmatch(scheme.pattern, base)
        if m:
            try:
                return scheme.make_config(m, head)
            except ValueError:
                break
    raise EvalsuiteError(
        f"unknown quantization scheme {name!r}; known: {', '.join(known_schemes())} (append +head to include the output "
        f"head), or FILE.py:Name, package.module:Name, torchao:Config, recipe:FILE"
    )


def parse_schemes(spec: str, skip: tuple[str, ...] = (), handler_timeout: float | None = None) -> list[object]:
    """``--quant``: entries separated by commas outside brackets; ``none`` → no quantized variant."""
    names = split_top_level(spec)
    if names == ["none"]:
        return []
    if not names:
        raise EvalsuiteError("--quant needs at least one scheme name (or 'none')")
    configs = [parse_scheme(n, skip, handler_timeout) for n in names]
    seen = set()
    for c in configs:
        if c.name in seen:
            raise EvalsuiteError(f"variant {c.name!r} is given twice in --quant (name one of them: NAME=SPEC)")
        seen.add(c.name)
    return configs


def check_runs_on(configs: list[object], device: torch.device, dtype: torch.dtype) -> list[object]:
    """Before the model loads: each torchao config quantizes and runs a small layer on ``device``.
    Returns the configs to use: a torchao int4 config left at torchao's default packing comes back
    with the packing that runs here (``torchao_config.note`` says which)."""
    return [torchao_config.check_runs_on(c, device, dtype) if isinstance(c, torchao_config.TorchaoConfig) else c
            for c in configs]


def packing_note(config: object) -> str | None:
    """The one line saying which packing ``check_runs_on`` chose for ``config``, or None."""
    return torchao_config.note(config) if isinstance(config, torchao_config.TorchaoConfig) else None


def describe(config: object, model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    """What the results should record about how ``config``'s variant ``model`` runs on ``device``:
    the packing a torchao config was given, which forward fp8 layers take. Empty when nothing."""
    details = dict(getattr(config, "details", None) or {})
    if isinstance(config, recipe.RecipeConfig):
        details.update(recipe.describe(config, model))
        details.setdefault("limits_as", config.default)  # a recipe is judged as its default scheme
    elif isinstance(config, Float8DynamicActivationFloat8WeightConfig):
        details["forward"] = forward_paths(model, device, dtype)
    elif isinstance(config, Float8WeightOnlyConfig):
        details["forward"] = "F.linear on the e4m3 weights cast to the compute dtype (no fp8 x bf16 kernel)"
    return details


def make_handler(model: nn.Module, config: object, skip: tuple[str, ...] = (),
                 only: tuple[str, ...] | None = None) -> QuantHandler:
    scheme = _SCHEMES.get(type(config))
    if scheme is None:
        raise EvalsuiteError(f"no quantization scheme is registered for {type(config).__name__}")
    policy = LayerPolicy(include_head=config.include_head, skip=skip, only=only)
    return scheme.make_handler(model, config, policy)


def quantize_(model: nn.Module, config: object, skip: tuple[str, ...] = (),
              only: tuple[str, ...] | None = None) -> nn.Module:
    """Quantize ``model`` with the scheme of ``config``; returns the quantized model (the same
    module, except where a user's handler returns a new one). ``only``: just these layers (a recipe's)."""
    transform = _TRANSFORMS.get(type(config))
    if transform is not None:
        return transform(model, config, LayerPolicy(include_head=bool(config.include_head), skip=skip, only=only))
    handler = make_handler(model, config, skip, only)
    state_dict = handler.create_quantized_state_dict()
    handler.convert_for_runtime()
    model.load_state_dict(state_dict, assign=True)
    return model
