"""Checks on a model evalsuite did not quantize itself (a user's handler output, a pre-quantized
checkpoint) before any stage measures it: finite weights, a working forward, the reference's
vocabulary. Each failure is the user's to fix: one line naming the variant. Non-finite *outputs*
of finite weights are not refused here: they are a measured regression (the ppl stage's
``nonfinite_tokens`` gate), not a usage error."""

from __future__ import annotations

import torch
from torch import nn

from evalsuite.errors import EvalsuiteError, first_line

PROBE_TOKENS = 8


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def nonfinite_tensor(model: nn.Module) -> str | None:
    """The name of the first floating weight or buffer holding NaN/inf (tensor subclasses such as
    torchao's are checked through their ``dequantize()``), else None."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is None or t.is_meta:
            continue
        if not _plain(t):
            deq = getattr(t, "dequantize", None)
            try:
                t = deq() if callable(deq) else None
            except Exception:  # a subclass that cannot dequantize here: its forward is probed below
                t = None
            if t is None:
                continue
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


@torch.no_grad()
def check_variant(name: str, model: nn.Module, vocab_size: int, device: torch.device, what: str) -> None:
    """Raise EvalsuiteError when ``model`` (the variant ``name``, made by ``what``) is unusable."""
    from evalsuite.load.model import forward_logits

    bad = nonfinite_tensor(model)
    if bad is not None:
        raise EvalsuiteError(f"variant {name} ({what}): {bad} holds NaN or inf values")
    ids = (torch.arange(PROBE_TOKENS, device=device) % max(1, vocab_size)).unsqueeze(0)
    try:
        with torch.inference_mode():
            logits = forward_logits(model, ids)
    except Exception as e:
        raise EvalsuiteError(f"variant {name} ({what}): its forward fails on a probe input "
                             f"({type(e).__name__}: {first_line(e)})") from None
    if logits.shape[-1] != vocab_size:
        raise EvalsuiteError(f"variant {name} ({what}): its logits have a vocabulary of {logits.shape[-1]}, "
                             f"the reference model's {vocab_size}; the comparison would be meaningless")
