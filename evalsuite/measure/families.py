"""Which of our GPU fast paths a model's family can take, and why not where it cannot.

Every stage runs any Hugging Face causal LM through its own (transformers) forward; the fast paths
replace parts of it only where they compute the same thing, which is decided per model:

- ``fused_kernels`` (:mod:`evalsuite.load.fast_forward`): a norm, MLP or rotary whose code is Llama's
  (RMSNorm ``w * x``, SwiGLU with separate gate/up projections, rotate-half rotary over the whole head).
  Qwen2, Mistral and Llama qualify; Phi-3's norms and rotary do but its fused ``gate_up_proj`` MLP
  does not; Gemma's ``(1 + w)`` RMSNorm and GELU-tanh MLP do not (its rotary does);
- ``packed_tasks`` (:mod:`evalsuite.measure.packed`): the model's, decoder layers' and attention's
  forwards are Llama's own code (so Llama only: Qwen2's attention carries a sliding-window argument,
  Mistral's and Gemma's forwards are their own);
- ``static_cache`` (:mod:`evalsuite.load.static_cache`, the gpt-fast decoder of generation and the
  speed stage): Llama, Mistral and Qwen2 blocks (q/k/v biases kept) without sliding windows,
  soft-capping, scaled embeddings or fused projections; it is also checked against the model's own
  forward on a probe before use.

A path a model cannot take falls back to the transformers forward, never to another number; each
refusal is one line here, recorded in results.json as ``run.fast_paths``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from evalsuite.load.static_cache import unsupported_reason
from evalsuite.measure.packed import packed_forward

PATHS = ("fused_kernels", "packed_tasks", "static_cache")


def _family_features(cfg: Any) -> list[str]:
    """What a family's config asks for that the Llama-only paths do not compute."""
    out = []
    kind = getattr(cfg, "model_type", None)
    if kind in ("gemma", "gemma2", "gemma3", "gemma3_text"):
        out.append("embeddings scaled by sqrt(hidden) and (1 + w) RMSNorm")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(cfg, name, None):
            out.append(f"{name.removesuffix('_softcapping').replace('_', ' ')} soft-capping")
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True):
        out.append(f"sliding-window attention ({window} tokens)")
    return out


def fused_kernel_reason(model: nn.Module) -> str | None:
    """Why none of ``model``'s norms and MLPs qualify for the fused kernels, or None if some do."""
    from evalsuite.load.fast_forward import _is_swiglu_mlp, _norm_eps

    norms = sum(_norm_eps(m) is not None for m in model.modules())
    mlps = sum(_is_swiglu_mlp(m) for m in model.modules())
    if norms and mlps:
        return None
    missing = [what for what, n in (("RMSNorm", norms), ("SwiGLU MLP", mlps)) if not n]
    return f"no Llama-code {' or '.join(missing)} (those run the transformers forward)"


def static_cache_reason(model: nn.Module) -> str | None:
    """Why the static-cache (gpt-fast) decoder refuses ``model``, or None if it may be probed."""
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    cfg = getattr(model, "config", None)
    features = _family_features(cfg)
    if features:
        return ", ".join(features)
    for layer in getattr(getattr(model, "model", None), "layers", None) or []:
        attn = getattr(layer, "self_attn", None)
        if not all(isinstance(getattr(attn, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj")):
            return "attention without separate q/k/v projections"
    return None


def fast_paths(model: nn.Module) -> dict[str, str]:
    """Each fast path → "used where it applies" or "transformers forward: <why>" for ``model``."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None) or type(model).__name__
    reasons = {
        "fused_kernels": fused_kernel_reason(model),
        "packed_tasks": None if packed_forward(model) is not None else (
            f"{kind}: forwards are not Llama's code" + "".join(f"; {f}" for f in _family_features(cfg))),
        "static_cache": static_cache_reason(model),
    }
    return {path: "on GPU, where it applies" if why is None else f"transformers forward: {why}"
            for path, why in reasons.items()}


def note(run: dict, model: nn.Module) -> None:
    """Record, once a run, which fast paths the model takes (``run.fast_paths``)."""
    if "fast_paths" not in run:
        run["fast_paths"] = fast_paths(model)
