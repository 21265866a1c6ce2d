"""``--quant torchao:Int8WeightOnlyConfig``: torchao's configs, run through ``torchao.quantization.quantize_``.

An optional extra (``pip install evalsuite[torchao]``). The config class is looked up in
``torchao.quantization`` and built with the spec's literal keywords when the spec is parsed; a
tiny linear layer is quantized and run on the run's device and dtype before the model loads, so a
config without a kernel there (torchao's int4 needs ``mslk``/CUDA) is one line, not a crash.
evalsuite's layer policy is torchao's ``filter_fn``: the head stays float unless ``+head``, and
``--skip-layers`` applies.

``Int4WeightOnlyConfig`` without an ``int4_packing_format``: torchao 0.18's default packing
(``plain``) has its kernel in ``mslk``, which no package index carries, so where the default's probe
fails the packing that has a kernel on the run's device is tried instead: ``tile_packed_to_4d``
(tinygemm; CUDA, bfloat16) on a GPU, and on a CPU the same tinygemm layout for the CPU kernel, torchao's
``Int4OpaqueTensor`` (``torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig``, packing
``opaque``). The choice is printed once and recorded with the variant. A packing format the user
gives is never overridden.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from evalsuite.errors import EvalsuiteError, first_line
from evalsuite.quantize.policy import LayerPolicy
from evalsuite.quantize.spec import Reference, ReferencedScheme

INSTALL_HINT = 'pip install "evalsuite[torchao]"'


@dataclass(frozen=True)
class TorchaoConfig(ReferencedScheme):
    config: Any  # the torchao config object
    # what check_runs_on chose where the spec left it open, e.g. (("int4_packing_format", "tile_packed_to_4d"), ...)
    chosen: tuple[tuple[str, Any], ...] = ()

    @property
    def include_head(self) -> bool:
        return self.ref.include_head

    @property
    def limits_as(self) -> str | None:
        """The built-in scheme of the same format, whose gate limits the variant is held to (the
        judge's ``schemes`` patterns are built-in names; a name of the user's own matches only ``*``)."""
        return limits_as(self.config)

    @property
    def details(self) -> dict[str, Any]:
        out = dict(self.chosen)
        if self.limits_as:
            out["limits_as"] = self.limits_as
        return out


def limits_as(config: Any) -> str | None:
    """``Int4WeightOnlyConfig(group_size=128)`` → ``int4-wo-g128``, ``Int8WeightOnlyConfig`` →
    ``int8-wo``, the fp8 configs → ``fp8-wo``/``fp8-dq`` (per row) or ``fp8-dq-tensor`` (torchao's
    default per-tensor granularity, whose limits are the unmeasured looser tier); None for a config of
    another format."""
    name = type(config).__name__
    if name in ("Int4WeightOnlyConfig", "PrototypeInt4WeightOnlyConfig"):
        group = getattr(config, "group_size", None)
        return f"int4-wo-g{group}" if group else "int4-wo"
    if name == "Float8DynamicActivationFloat8WeightConfig":
        granularity = getattr(config, "granularity", None)
        parts = granularity if isinstance(granularity, (list, tuple)) else [granularity]
        return "fp8-dq" if parts and all(type(g).__name__ == "PerRow" for g in parts) else "fp8-dq-tensor"
    return {"Int8WeightOnlyConfig": "int8-wo", "Int8DynamicActivationInt8WeightConfig": "int8-dq",
            "Float8WeightOnlyConfig": "fp8-wo", "Float8DynamicActivationFloat8WeightConfig": "fp8-dq"}.get(name)


def _torchao_quantization():
    try:
        import torchao.quantization as q
    except ImportError as e:
        raise EvalsuiteError(f"--quant torchao:...: torchao is not installed ({first_line(e)}); {INSTALL_HINT}") from None
    return q


def make_config(ref: Reference, label: str) -> TorchaoConfig:
    q = _torchao_quantization()
    from torchao.core.config import AOBaseConfig

    cls = getattr(q, ref.attr, None)
    if not (isinstance(cls, type) and issubclass(cls, AOBaseConfig)):
        known = sorted(n for n, v in vars(q).items() if isinstance(v, type) and issubclass(v, AOBaseConfig)
                       and v is not AOBaseConfig)
        raise EvalsuiteError(f"--quant {ref.text}: torchao.quantization has no config {ref.attr!r}; "
                             f"known: {', '.join(known)}")
    try:
        config = cls(**dict(ref.kwargs))
    except Exception as e:  # a bad keyword or value: the config's own message
        raise EvalsuiteError(f"--quant {ref.text}: {type(e).__name__}: {first_line(e)}") from None
    return TorchaoConfig(ref=ref, label=label, config=config)


def _quantize(model: nn.Module, cfg: TorchaoConfig, filter_fn) -> None:
    from torchao.quantization import quantize_

    quantize_(model, cfg.config, filter_fn=filter_fn)


def _probe(cfg: TorchaoConfig, device: torch.device, dtype: torch.dtype) -> Exception | None:
    """Quantize and run one 256x256 linear layer where the model will run; the failure, if any."""
    probe = nn.Sequential(nn.Linear(256, 256, bias=False)).to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            _quantize(probe, cfg, None)
            probe(torch.randn(4, 256, device=device, dtype=dtype))
    except Exception as e:  # noqa: BLE001 - any failure means no kernel here; its message is shown
        return e
    return None


def _int4_cpu_config(config) -> Any:
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=config.group_size,
                                         int4_choose_qparams_algorithm=config.int4_choose_qparams_algorithm,
                                         set_inductor_config=config.set_inductor_config)


# device type → (packing format, fn(torchao config) -> the config that packs so), tried in order
INT4_FALLBACKS: dict[str, list[tuple[str, Callable[[Any], Any]]]] = {
    "cuda": [("tile_packed_to_4d", lambda c: dataclasses.replace(c, int4_packing_format="tile_packed_to_4d"))],
    "cpu": [("opaque", _int4_cpu_config)],
}


def _fallbacks(cfg: TorchaoConfig, device: torch.device) -> list[tuple[str, Callable[[Any], Any]]]:
    """Other packings worth trying for ``cfg`` on ``device``: only for an Int4WeightOnlyConfig whose
    spec names no packing format."""
    if cfg.ref.attr != "Int4WeightOnlyConfig" or "int4_packing_format" in dict(cfg.ref.kwargs):
        return []
    return INT4_FALLBACKS.get(device.type, [])


def check_runs_on(cfg: TorchaoConfig, device: torch.device, dtype: torch.dtype) -> TorchaoConfig:
    """``cfg`` if it runs on ``device`` in ``dtype``; else, for an int4 config left at torchao's
    default packing, the first packing that does (its choice in ``chosen`` and ``note``); else one
    line saying why not."""
    where = f"{device.type} in {str(dtype).removeprefix('torch.')}"
    error = _probe(cfg, device, dtype)
    if error is None:
        return cfg
    tried = []
    for fmt, make in _fallbacks(cfg, device):
        try:
            candidate = dataclasses.replace(cfg, config=make(cfg.config))
        except Exception as e:  # noqa: BLE001 - this torchao lacks the fallback: say so, try the next
            tried.append(f"{fmt}: {type(e).__name__}: {first_line(e)}")
            continue
        fallback_error = _probe(candidate, device, dtype)
        if fallback_error is None:
            default = getattr(cfg.config, "int4_packing_format", "default")
            made = type(candidate.config)
            reason = f"{type(error).__name__}: {first_line(error)}"
            return dataclasses.replace(candidate, chosen=(
                ("int4_packing_format", fmt), ("torchao_config", f"{made.__module__}.{made.__qualname__}"),
                ("why", f"the default packing {getattr(default, 'value', default)!r} cannot run on {where} "
                        f"({reason})")))
        tried.append(f"{fmt}: {type(fallback_error).__name__}: {first_line(fallback_error)}")
    also = f"; tried int4_packing_format {'; '.join(tried)}" if tried else ""
    raise EvalsuiteError(f"--quant {cfg.spec}: torchao's {cfg.ref.attr} cannot run on {where} with this torchao "
                         f"({type(error).__name__}: {first_line(error)}){also}")


def note(cfg: TorchaoConfig) -> str | None:
    """The one line that says what ``check_runs_on`` chose, or None when it chose nothing."""
    d = dict(cfg.chosen)
    if not d:
        return None
    return f"--quant {cfg.spec}: int4_packing_format={d['int4_packing_format']} ({d['why']})"


def apply(model: nn.Module, cfg: TorchaoConfig, policy: LayerPolicy) -> nn.Module:
    chosen = set(policy.select(model))
    try:
        _quantize(model, cfg, lambda module, fqn: fqn in chosen)
    except Exception as e:
        raise EvalsuiteError(f"handler {cfg.name} ({cfg.spec}) raised {type(e).__name__}: {first_line(e)}") from None
    return model
