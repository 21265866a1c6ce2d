"""Fused inference forwards for Llama-family models: fewer, larger kernels for the elementwise work
around the matmuls. Opt-in (``with fast_forward(model):``), device-guarded, numerics of the eager
modules kept within the dtype's rounding. Forward only: no autograd through the kernels.

Three Triton kernels, each reading its inputs once and rounding once to the output dtype:

- ``rms_norm``: ``y = weight * (x_f32 * rsqrt(mean(x_f32**2) + eps)).to(x.dtype)`` as Hugging Face's
  ``LlamaRMSNorm`` (normalise in float32, round to the input dtype, then multiply by the weight in
  the promoted dtype of weight and input). The only differences from eager are the order of the
  float32 sum of squares and the hardware rsqrt, below bf16/fp16 rounding and ~1e-6 in fp32.
- ``rotary``: ``apply_rotary_pos_emb`` with the rotate-half convention,
  ``out[..., :D/2] = x1*cos1 - x2*sin1`` and ``out[..., D/2:] = x2*cos2 + x1*sin2``, for q and k in one
  launch, computed in float32 and rounded once (eager rounds each product and the sum: a few ulps).
  q/k may be strided views (the attention module's view+transpose); the output keeps q's strides.
- ``silu_mul``: ``silu(gate) * up`` with silu in float32, rounded once (eager rounds twice).

And with no kernel of its own: evalsuite's int8 weight-only linear (the gpt-fast seed's module,
``F.linear(x, W_int8) * s``) runs ``F.linear(x, W_int8 * s)`` with the product in x's dtype: the same
quantized weights, the output rounded once instead of twice, and no elementwise pass over the output
(on a 16k-token batch that pass took as long as the matmul).

Sizes that change from call to call (rows, sequence length) are not specialised on, so each kernel
compiles once per dtype and configuration, not once per new batch shape.

``fast_forward(model)`` swaps these in per module instance (classes and transformers' functions are
left as they are, and everything is restored on exit). A fused forward runs only for CUDA tensors
(or any tensor under ``TRITON_INTERPRET=1``, for testing) that autograd does not track; otherwise the
original forward runs.
Without Triton (CPU-only installs) the module imports and ``fast_forward`` patches nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.kernels import HAVE_TRITON, INTERPRET  # noqa: F401  (re-exported for callers and tests)
from evalsuite.kernels.llama_fused import MAX_NORM_WIDTH, kernels_apply, rms_norm, rotary, silu_mul  # noqa: F401

_FUSED_MARK = "_evalsuite_fused"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- which modules qualify

def same_code(f: Callable, g: Callable) -> bool:
    """Same bytecode, names and constants beneath any decorators: a copied forward (transformers'
    "Copied from" classes)."""
    a, b = (getattr(inspect.unwrap(x), "__code__", None) for x in (f, g))
    return (a is not None and b is not None and a.co_code == b.co_code and a.co_names == b.co_names
            and a.co_consts == b.co_consts)


def _llama_reference() -> Any:
    from transformers.models.llama import modeling_llama

    return modeling_llama


def _norm_eps(m: nn.Module) -> float | None:
    """eps of an RMSNorm with LlamaRMSNorm's forward (or gpt-fast's RMSNorm, same numerics), else None."""
    from evalsuite.load.gptfast import RMSNorm as GptFastRMSNorm

    weight = getattr(m, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() > MAX_NORM_WIDTH:
        return None
    if type(m) is GptFastRMSNorm:
        return float(m.eps)
    if (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "variance_epsilon", None), float)
            and same_code(type(m).forward, _llama_reference().LlamaRMSNorm.forward)):
        return m.variance_epsilon
    return None


def _is_swiglu_mlp(m: nn.Module) -> bool:
    """gate/up/down projections, SiLU activation and LlamaMLP's forward (whatever the linears are)."""
    from transformers import activations

    silu_types = (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))
    return (all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(getattr(m, "act_fn", None), silu_types)
            and same_code(type(m).forward, _llama_reference().LlamaMLP.forward))


def _rotate_half_reference(q, k, cos, sin):
    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2), dim=-1)

    cos1, cos2 = cos.unsqueeze(1).chunk(2, dim=-1)
    sin1, sin2 = sin.unsqueeze(1).chunk(2, dim=-1)
    return rot(q), rot(k)


def _is_rotate_half_rotary(fn: Callable) -> bool:
    """Does ``fn(q, k, cos, sin)`` compute the rotate-half rotary? Checked on small float64 CPU tensors,
    so a modeling module with another convention (interleaved, partial) is never patched."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64), torch.randn(2, 1, 5, 8, generator=gen,
                                                                                      dtype=torch.float64)
    cos, sin = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64), torch.randn(2, 5, 8, generator=gen,
                                                                                       dtype=torch.float64)
    try:
        got = fn(q, k, cos, sin)
    except Exception:  # another signature: not ours to replace
        return False
    want = _rotate_half_reference(q, k, cos, sin)
    return (isinstance(got, tuple) and len(got) == 2
            and all(isinstance(g, torch.Tensor) and g.shape == w.shape and torch.allclose(g, w, rtol=1e-12, atol=1e-12)
                    for g, w in zip(got, want)))


# ---- fused forwards (fall back to the original outside CUDA / the interpreter)

def _needs_grad(*tensors: torch.Tensor) -> bool:
    """The kernels have no backward: while autograd records, tensors that need gradients go eager."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _fused_norm(m: nn.Module, original: Callable, eps: float, x: torch.Tensor) -> torch.Tensor:
    if not kernels_apply(x) or x.dtype not in _FLOAT_DTYPES or _needs_grad(x, m.weight):
        return original(x)
    return rms_norm(x, m.weight, eps)


def _fused_mlp(m: nn.Module, original: Callable, x: torch.Tensor) -> torch.Tensor:
    if not kernels_apply(x):
        return original(x)
    gate, up = m.gate_proj(x), m.up_proj(x)
    if _needs_grad(gate, up):  # LlamaMLP's expression on the projections already computed
        return m.down_proj(m.act_fn(gate) * up)
    return m.down_proj(silu_mul(gate, up))



def _fused_int8_linear(m: nn.Module, original: Callable, x: torch.Tensor) -> torch.Tensor:
    if not kernels_apply(x) or x.dtype not in _FLOAT_DTYPES or _needs_grad(x):
        return original(x)
    # W_int8 * s in x's dtype, then one matmul (bias in its epilogue): no pass over the output
    weight = m.weight.to(x.dtype) * m.scales.to(x.dtype).unsqueeze(-1)
    return F.linear(x, weight, None if m.bias is None else m.bias.to(x.dtype))


def _make_fused_rotary(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # the fused path takes exactly the attention modules' call: four tensors, unsqueeze_dim 1
        if (args or any(key != "unsqueeze_dim" or val != 1 for key, val in kwargs.items())
                or not kernels_apply(q) or not _rotary_shapes_ok(q, k, cos, sin) or _needs_grad(q, k, cos, sin)):
            return original(q, k, cos, sin, *args, **kwargs)
        return rotary(q, k, cos, sin)

    setattr(apply_rotary_pos_emb, _FUSED_MARK, original)
    apply_rotary_pos_emb.__doc__ = "Fused rotate-half rotary (evalsuite.load.fast_forward); falls back to the original."
    return apply_rotary_pos_emb


def _rotary_shapes_ok(q, k, cos, sin) -> bool:
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    bsz, _, seq_len, dim = q.shape
    return (k.shape[0] == bsz and k.shape[2] == seq_len and k.shape[3] == dim and dim % 2 == 0
            and cos.shape[1] == seq_len and cos.shape[2] == dim and cos.shape[0] in (1, bsz)
            and q.dtype == k.dtype and q.dtype in _FLOAT_DTYPES and cos.dtype in _FLOAT_DTYPES
            and sin.dtype == cos.dtype and k.device == q.device == cos.device == sin.device)


def _patch_forward(m: nn.Module, fused: Callable, *extra: Any) -> Callable[[], None]:
    """Give ``m`` an instance ``forward`` running ``fused(m, original_forward, *extra, x)``; returns the undo."""
    original = m.forward

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return fused(m, original, *extra, *args, **kwargs)

    setattr(forward, _FUSED_MARK, original)
    m.forward = forward
    return lambda: m.__dict__.pop("forward", None)


def _patch_modules(model: nn.Module, undo: list[Callable[[], None]]) -> int:
    """Patch every qualifying RMSNorm, MLP and int8 weight-only linear; count those that run fused
    (already patched included)."""
    from evalsuite.quantize.int8_wo import WeightOnlyInt8Linear

    count = 0
    for m in model.modules():
        own = m.__dict__.get("forward")
        if own is not None:  # someone's instance forward (hooks, an enclosing fast_forward): leave it
            count += hasattr(own, _FUSED_MARK)
            continue
        eps = _norm_eps(m)
        if eps is not None:
            undo.append(_patch_forward(m, _fused_norm, eps))
            count += 1
        elif _is_swiglu_mlp(m):
            undo.append(_patch_forward(m, _fused_mlp))
            count += 1
        elif type(m) is WeightOnlyInt8Linear:
            undo.append(_patch_forward(m, _fused_int8_linear))
            count += 1
    return count


def _patch_rotary(model: nn.Module, undo: list[Callable[[], None]]) -> int:
    """Replace ``apply_rotary_pos_emb`` in the modeling module of each attention class; count the
    attention modules whose rotary is then fused."""
    verdict: dict[str, bool] = {}
    count = 0
    for m in model.modules():
        name = type(m).__module__
        if not type(m).__name__.endswith("Attention") or name not in sys.modules:
            continue
        if name not in verdict:
            module = sys.modules[name]
            fn = getattr(module, "apply_rotary_pos_emb", None)
            if fn is None:
                verdict[name] = False
            elif hasattr(fn, _FUSED_MARK):  # an enclosing fast_forward patched it
                verdict[name] = True
            elif _is_rotate_half_rotary(fn):
                module.apply_rotary_pos_emb = _make_fused_rotary(fn)
                undo.append(lambda module=module, fn=fn: setattr(module, "apply_rotary_pos_emb", fn))
                verdict[name] = True
            else:
                verdict[name] = False
        count += verdict[name]
    return count


@contextlib.contextmanager
def fast_forward(model: nn.Module) -> Iterator[int]:
    """Within the block, the model's Llama-style RMSNorms, SwiGLU MLPs and rotary embedding run the
    fused Triton kernels on CUDA tensors. Yields the number of modules that run fused (norms, MLPs,
    and attention modules whose ``apply_rotary_pos_emb`` is fused); 0 without Triton or for other
    architectures. Every patch is undone on exit, exceptions included.

    The rotary patch is a module attribute of the model's modeling module, so while the block is open
    it also applies to other models of the same family (with identical results within rounding)."""
    undo: list[Callable[[], None]] = []
    try:
        count = 0
        if HAVE_TRITON:
            count = _patch_modules(model, undo) + _patch_rotary(model, undo)
        yield count
    finally:
        for step in reversed(undo):
            step()


@contextlib.contextmanager
def fast_forward_all(*models: nn.Module | None, enabled: bool = True) -> Iterator[int]:
    """:func:`fast_forward` over every given model (None skipped) when ``enabled``; yields how many
    modules run fused in all (0 when not enabled). Exits in reverse order, as nested blocks would."""
    with contextlib.ExitStack() as stack:
        count = 0
        for m in models if enabled else ():
            if m is not None:
                count += stack.enter_context(fast_forward(m))
        yield count
