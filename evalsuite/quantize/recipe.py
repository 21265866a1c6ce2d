"""``--quant recipe:FILE``: a mixed-precision recipe, one scheme per linear layer.

A recipe is a versioned YAML or JSON file::

    {"schema": "evalsuite.recipe/1", "default": "int4-wo-g128",
     "layers": [{"pattern": "model.layers.*.mlp.down_proj", "scheme": "int8-wo"},
                {"pattern": "model.layers.0.*", "scheme": "fp"}]}

Each linear layer the policy selects (output head excluded; ``--skip-layers`` honoured) takes the
scheme of the first ``layers`` entry whose fnmatch ``pattern`` matches its qualified name, else
``default``. A scheme is any built-in name (``evalsuite schemes``) or ``fp`` (left in float); each
layer is quantized by its own scheme's handler, so a recipe variant runs wherever its schemes do,
the speed stage included. The file is read when ``--quant`` is parsed (before the model loads); a
pattern that matches no layer is refused when the model is quantized.

Effective bits per weight (:func:`bits_per_weight`) = 8 x bytes of the layers' weight tensors as
stored (codes, scales and zeros; float layers at their dtype; biases excluded) / number of weights.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from evalsuite.errors import EvalsuiteError
from evalsuite.quantize.policy import LayerPolicy
from evalsuite.quantize.spec import slug

SCHEMA = "evalsuite.recipe/1"
PREFIX = "recipe:"
FLOAT = "fp"


@dataclass(frozen=True)
class RecipeConfig:
    """A recipe as read from ``path``: ``rules`` are (pattern, scheme) in file order."""

    path: str
    default: str
    rules: tuple[tuple[str, str], ...]
    text: str  # the file's content, as recorded in results.json
    sha256: str
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or slug(Path(self.path).stem)

    @property
    def spec(self) -> str:
        return PREFIX + self.path

    @property
    def include_head(self) -> None:
        """None: the layers stage does not derive its expected float layers from a head policy
        (a recipe's ``fp`` layers are float by design)."""
        return None

    def scheme_of(self, layer: str) -> str:
        return next((s for p, s in self.rules if fnmatch.fnmatchcase(layer, p)), self.default)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "default": self.default,
                "layers": [{"pattern": p, "scheme": s} for p, s in self.rules]}


def is_recipe(body: str) -> bool:
    return body.startswith(PREFIX)


def _check_scheme(scheme: Any, where: str) -> str:
    from evalsuite.quantize.registry import _parse_builtin

    if not isinstance(scheme, str) or not scheme:
        raise EvalsuiteError(f"{where}: scheme must be a scheme name, got {scheme!r}")
    if scheme == FLOAT:
        return scheme
    if scheme.endswith("+head"):
        raise EvalsuiteError(f"{where}: scheme {scheme!r}: a recipe does not quantize the output head (drop +head)")
    try:
        _parse_builtin(scheme)
    except EvalsuiteError as e:
        raise EvalsuiteError(f"{where}: {e}") from None
    return scheme


def parse_recipe(data: Any, where: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The (default, rules) of a recipe's parsed content; one-line errors naming ``where``."""
    if not isinstance(data, dict):
        raise EvalsuiteError(f"{where}: expected a mapping with schema, default and layers")
    if data.get("schema") != SCHEMA:
        raise EvalsuiteError(f"{where}: schema {data.get('schema')!r} is not supported (expected {SCHEMA!r})")
    unknown = set(data) - {"schema", "default", "layers"}
    if unknown:
        raise EvalsuiteError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (expected schema, default, layers)")
    default = _check_scheme(data.get("default"), f"{where}: default")
    layers = data.get("layers") or []
    if not isinstance(layers, list):
        raise EvalsuiteError(f"{where}: layers must be a list of {{pattern, scheme}}")
    rules = []
    for i, entry in enumerate(layers):
        at = f"{where}: layers[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"pattern", "scheme"} or not isinstance(entry["pattern"], str):
            raise EvalsuiteError(f"{at}: expected {{pattern: GLOB, scheme: NAME}}, got {entry!r}")
        rules.append((entry["pattern"], _check_scheme(entry["scheme"], at)))
    return default, tuple(rules)


def load(path: str, label: str | None = None) -> RecipeConfig:
    """``--quant [NAME=]recipe:FILE`` → its config; the file is read and checked now."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalsuiteError(f"--quant recipe:{path}: cannot read the recipe ({type(e).__name__}: "
                             f"{getattr(e, 'strerror', None) or e})") from None
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - a parser's own error type; one line for the user
        raise EvalsuiteError(f"--quant recipe:{path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    default, rules = parse_recipe(data, f"--quant recipe:{path}")
    return RecipeConfig(path=str(p.resolve()), default=default, rules=rules, text=text,
                        sha256=hashlib.sha256(raw).hexdigest(), label=label)


def assign(model: nn.Module, config: RecipeConfig, policy: LayerPolicy) -> dict[str, str]:
    """Layer → scheme for the layers ``policy`` selects; a rule matching none of them is an error."""
    names = policy.select(model)
    unmatched = [p for p, _ in config.rules if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise EvalsuiteError(f"recipe {config.path}: pattern {', '.join(unmatched)} matches no quantized linear layer "
                             f"of the model (named like {', '.join(names[:3]) or 'nothing'})")
    return {n: config.scheme_of(n) for n in names}


def apply(model: nn.Module, config: RecipeConfig, policy: LayerPolicy) -> nn.Module:
    """Quantize each layer by its scheme's own handler, one handler per scheme over its layers."""
    from evalsuite.quantize.registry import _parse_builtin, quantize_

    groups: dict[str, list[str]] = {}
    for layer, scheme in assign(model, config, policy).items():
        groups.setdefault(scheme, []).append(layer)
    for scheme, layers in groups.items():
        if scheme != FLOAT:
            model = quantize_(model, _parse_builtin(scheme), only=tuple(layers))
    return model


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a linear layer's weight as stored: float weight, or codes + scales + zeros (no bias)."""
    return sum(t.numel() * t.element_size() for n, t in [*module.named_parameters(recurse=False),
                                                           *module.named_buffers(recurse=False)] if n != "bias")


def bits_per_weight(model: nn.Module, layers: list[str]) -> float:
    """8 x bytes of ``layers``' stored weights / their number of weights (see the module docstring)."""
    n = sum(model.get_submodule(l).in_features * model.get_submodule(l).out_features for l in layers)
    return 8 * sum(weight_bytes(model.get_submodule(l)) for l in layers) / n if n else 0.0


def linear_layers(model: nn.Module) -> list[str]:
    """The linear layers of ``model``, float or quantized, except the output head."""
    from evalsuite.quantize.policy import output_head_name

    head = output_head_name(model)
    return [n for n, m in model.named_modules() if n != head and (
        isinstance(m, nn.Linear) or (hasattr(m, "dequantize") and hasattr(m, "in_features")))]


def describe(config: RecipeConfig, model: nn.Module) -> dict[str, Any]:
    """What results.json records about a recipe variant ``model``: the file, its sha256, the layers
    per scheme and the effective bits per weight over its linear layers except the output head."""
    layers = linear_layers(model)
    counts: dict[str, int] = {}
    for layer in layers:
        counts[config.scheme_of(layer)] = counts.get(config.scheme_of(layer), 0) + 1
    return {"recipe": {"path": config.path, "sha256": config.sha256, "content": config.text,
                       "layers_by_scheme": counts},
            "bits_per_weight": bits_per_weight(model, layers),
            "bits_per_weight_definition": "8 x bytes of the linear layers' stored weights (codes, scales, zeros; "
                                          "float layers at their dtype; no biases; output head excluded) / their "
                                          "number of weights"}
