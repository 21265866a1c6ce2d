"""``--quant torchao:Int8WeightOnlyConfig``: torchao's configs, run through ``torchao.quantization.quantize_``.

An optional extra (``pip install evalsuite[torchao]``). The config class is looked up in
``torchao.quantization`` and built with the spec's literal keywords when the spec is parsed; a
tiny linear layer is quantized and run on the run's device and dtype before the model loads, so a
config without a kernel there (torchao's int4 needs ``mslk``/CUDA) is one line, not a crash.
evalsuite's layer policy is torchao's ``filter_fn``: the head stays float unless ``+head``, and
``--skip-layers`` applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from evalsuite.errors import EvalsuiteError, first_line
from evalsuite.quantize.policy import LayerPolicy
from evalsuite.quantize.spec import Reference, ReferencedScheme

INSTALL_HINT = 'pip install "evalsuite[torchao]"'


@dataclass(frozen=True)
class TorchaoConfig(ReferencedScheme):
    config: Any  # the torchao config object

    @property
    def include_head(self) -> bool:
        return self.ref.include_head


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


def check_runs_on(cfg: TorchaoConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize and run one 256x256 linear layer where the model will run: no kernel → one line."""
    probe = nn.Sequential(nn.Linear(256, 256, bias=False)).to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            _quantize(probe, cfg, None)
            probe(torch.randn(4, 256, device=device, dtype=dtype))
    except Exception as e:
        raise EvalsuiteError(f"--quant {cfg.spec}: torchao's {cfg.ref.attr} cannot run on {device.type} in "
                             f"{str(dtype).removeprefix('torch.')} with this torchao ({type(e).__name__}: "
                             f"{first_line(e)})") from None


def apply(model: nn.Module, cfg: TorchaoConfig, policy: LayerPolicy) -> nn.Module:
    chosen = set(policy.select(model))
    try:
        _quantize(model, cfg, lambda module, fqn: fqn in chosen)
    except Exception as e:
        raise EvalsuiteError(f"handler {cfg.name} ({cfg.spec}) raised {type(e).__name__}: {first_line(e)}") from None
    return model
