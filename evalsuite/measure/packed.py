"""Packed forwards for Llama-architecture Hugging Face models: many sequences back to back in one row,
no padding, and sequences that continue a shared prefix without recomputing it.

A packed batch is ``T`` tokens in query segments ``cu_q`` (cumulative lengths). Segment ``s`` attends
causally to its key segment ``s``: the token slots ``key_index[cu_k[s]:cu_k[s+1]]`` (the segment's own
tokens, or a shared prefix's slots followed by its own), aligned at the end, so the query's last token
sees every key and each earlier query token one key fewer. Each token carries its rotary position, so
a continuation that follows a 40-token prefix in another segment is computed exactly as if the
prefix stood before it: the multiple-choice items of ARC (one question, four answers) cost one
question and four answers, not four questions and four answers.

The computation is the model's own, module by module (embedding, norms, projections, rotary, MLP, head:
the same modules, quantized or fused ones included); only attention is done differently, by
``torch.nn.attention.varlen.varlen_attn`` (flash attention over variable-length segments) on a GPU
in 16-bit, or by a masked reference elsewhere (small inputs: tests).

It applies only where the model's forwards are Llama's own code (``LlamaForCausalLM`` and classes
copied from it unchanged), which :func:`packed_forward` checks, and the adapter then checks once, on
a probe input, that the packed logits equal the model's own forward within rounding.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.load.fast_forward import same_code


def varlen_attention() -> Callable | None:
    """torch's flash attention over variable-length segments, where this torch has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if "window_size" in params else None


class PackedForward:
    """``logits(...)``: the model's logits at chosen token slots of one packed batch (see module doc)."""

    def __init__(self, model: nn.Module, attention: str) -> None:
        self.model = model
        self.inner = model.model
        self.head = model.get_output_embeddings()
        self.attention = attention  # "varlen" or "masked"
        self._varlen = varlen_attention() if attention == "varlen" else None
        self._gqa_kw = ({"enable_gqa": True} if self._varlen is not None
                        and "enable_gqa" in inspect.signature(self._varlen).parameters else {})

    def logits(self, ids: torch.Tensor, positions: torch.Tensor, key_index: torch.Tensor | None,
               cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, scored: torch.Tensor) -> torch.Tensor:
        """Logits [len(scored), vocab] at token slots ``scored`` of the packed tokens ``ids`` [T] with
        rotary ``positions`` [T]; ``key_index`` None means every key segment is its query segment."""
        inner = self.inner
        hidden = inner.embed_tokens(ids[None])
        cos, sin = inner.rotary_emb(hidden, positions[None])
        attend = self._attend_fn(cu_q, cu_k, max_q, max_k)
        for layer in inner.layers[: inner.config.num_hidden_layers]:
            residual = hidden
            hidden = residual + self._attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                                key_index, attend)
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = inner.norm(hidden)
        return self.head(hidden[0, scored])

    def _attention(self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   key_index: torch.Tensor | None, attend: Callable) -> torch.Tensor:
        """LlamaAttention.forward on one packed row, attention by ``attend``."""
        n = x.shape[1]
        shape = (1, n, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape)
        # the modeling module's own rotary (fast_forward's fused one while it is active)
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        q, k, v = q.transpose(1, 2)[0], k.transpose(1, 2)[0], v[0]  # [T, heads, head_dim]
        if key_index is not None:
            k, v = k.index_select(0, key_index), v.index_select(0, key_index)
        out = attend(q, k, v, attn.scaling)
        return attn.o_proj(out.reshape(1, n, -1))

    def _attend_fn(self, cu_q, cu_k, max_q, max_k) -> Callable:
        """attend(q, k, v, scale) over the segments: flash varlen, or the masked reference."""
        if self._varlen is not None:
            varlen, kw = self._varlen, self._gqa_kw

            def attend(q, k, v, scale):
                return varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0), **kw)

            return attend
        mask = segment_causal_mask(cu_q, cu_k)

        def attend_masked(q, k, v, scale):
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                 v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])
            return out[0].transpose(0, 1)

        return attend_masked


def segment_causal_mask(cu_q: torch.Tensor, cu_k: torch.Tensor) -> torch.Tensor:
    """[T, Tk] bool: query i may see key j when both are in segment s and j's offset from its
    segment's end is at least i's (causal, aligned at the segments' ends)."""
    n_seg = cu_q.numel() - 1
    len_q, len_k = cu_q.diff(), cu_k.diff()
    seg_q = torch.repeat_interleave(torch.arange(n_seg, device=cu_q.device), len_q)
    seg_k = torch.repeat_interleave(torch.arange(n_seg, device=cu_k.device), len_k)
    # distance from the segment's last token: 0 for the last, 1 for the one before, ...
    back_q = cu_q[1:][seg_q] - 1 - torch.arange(int(cu_q[-1]), device=cu_q.device)
    back_k = cu_k[1:][seg_k] - 1 - torch.arange(int(cu_k[-1]), device=cu_k.device)
    return (seg_q[:, None] == seg_k[None, :]) & (back_k[None, :] >= back_q[:, None])


def packed_forward(model: nn.Module) -> PackedForward | None:
    """A :class:`PackedForward` for ``model`` where its forwards are Llama's own code, else None.
    Attention is flash ``varlen`` for CUDA weights in bf16/fp16 where torch has it, else masked."""
    try:
        from transformers.models.llama import modeling_llama as llama
    except ImportError:
        return None
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not (isinstance(model, nn.Module) and isinstance(inner, nn.Module) and isinstance(layers, nn.ModuleList)
            and len(layers) and callable(getattr(model, "get_output_embeddings", None))):
        return None
    head = model.get_output_embeddings()
    checks = [(type(model).forward, llama.LlamaForCausalLM.forward), (type(inner).forward, llama.LlamaModel.forward)]
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(layer, "mlp", None) is None:
            return None
        checks += [(type(layer).forward, llama.LlamaDecoderLayer.forward),
                   (type(attn).forward, llama.LlamaAttention.forward)]
        if not callable(getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)):
            return None
    if not isinstance(head, nn.Module) or not all(same_code(f, g) for f, g in checks):
        return None
    weight = getattr(inner.embed_tokens, "weight", None) if hasattr(inner, "embed_tokens") else None
    if not isinstance(weight, torch.Tensor):
        return None
    fast = weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and varlen_attention() is not None
    return PackedForward(model, "varlen" if fast else "masked")
