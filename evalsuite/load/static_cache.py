"""A static-KV-cache decoder for batched generation over a Hugging Face Llama-style model.

Built on the speed stage's gpt-fast decoder (:func:`evalsuite.load.gptfast.from_hf`: the model's own,
possibly quantized, linear modules, q/k/v fused, norms and head shared), with a cache preallocated
as ``[rows, kv_heads, slots, head_dim]`` per layer, so a decoding step has the same shapes from the
first step to the last and can be captured once as a CUDA graph.

Left-padded rows share cache slots: every row's prompt ends at the same slot and each step writes
one slot for all rows. A row's rotary position is ``slot - start[row]`` (its first real token is
position 0) and its keys are the slots from ``start[row]`` on; pad slots are never attended to
except by the pad query itself (a query with no key at all would make NaNs that travel on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evalsuite.errors import EvalsuiteError
from evalsuite.load import gptfast

LLAMA_TYPES = gptfast.LLAMA_TYPES  # the families whose blocks the gpt-fast decoder computes exactly
SLOT_MULTIPLE = 16  # cache length rounded up: the memory-efficient attention kernel wants aligned masks


def _replaced_forward(hf_model: nn.Module) -> str | None:
    """The first module the decoder would not call as the model does: one with hooks or a forward of
    its own (a wrapper, a planted fault) other than evalsuite's fused ones, which compute the same.
    Linear layers are exempt: the decoder calls them."""
    from evalsuite.load.fast_forward import _FUSED_MARK

    for name, m in hf_model.named_modules():
        if isinstance(m, nn.Linear) or not list(m.parameters(recurse=False)) and not list(m.children()):
            continue
        own = m.__dict__.get("forward")
        if (own is not None and not hasattr(own, _FUSED_MARK)) or m._forward_hooks or m._forward_pre_hooks:
            return f"module {name or type(m).__name__} has its own forward or hooks"
    return None


def unsupported_reason(hf_model: nn.Module) -> str | None:
    """Why ``hf_model`` cannot use the static-cache decoder, or None if it can."""
    replaced = _replaced_forward(hf_model)
    if replaced is not None:
        return replaced
    cfg = getattr(hf_model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in LLAMA_TYPES:
        return f"model type {kind!r} is not one of {', '.join(LLAMA_TYPES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    scaling = getattr(cfg, "rope_scaling", None) or {}
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) in ("dynamic", "longrope"):
        return f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r} depends on the sequence length"
    return None


class StaticCacheDecoder(nn.Module):
    """``forward(ids, slots, start)`` -> logits of each row's last position, writing the K/V of
    ``ids`` [rows, len] at cache ``slots`` [len] of rows ``row0 .. row0 + rows``."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        reason = unsupported_reason(hf_model)
        if reason is not None:
            raise EvalsuiteError(f"static-cache decoding: {reason}")
        self.net = gptfast.from_hf(hf_model)
        a = self.net.layers[0].attention
        self.n_head, self.n_kv, self.head_dim = a.n_head, a.n_local_heads, a.head_dim
        self.k_cache: list[Tensor] = []
        self.v_cache: list[Tensor] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.net.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.net.norm.weight.device

    def slot_bytes(self) -> int:
        """Cache bytes of one row and one slot (all layers, keys and values)."""
        return len(self.net.layers) * 2 * self.n_kv * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def allocate(self, rows: int, slots: int) -> int:
        """(Re)allocate the cache for ``rows`` x ``slots`` (rounded up); returns the slot count."""
        self.release()
        slots = -(-slots // SLOT_MULTIPLE) * SLOT_MULTIPLE
        shape = (rows, self.n_kv, slots, self.head_dim)
        for _ in self.net.layers:
            self.k_cache.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            self.v_cache.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
        return slots

    def release(self) -> None:
        self.k_cache, self.v_cache = [], []

    def forward(self, ids: Tensor, slots: Tensor, start: Tensor, row0: int = 0, n_keys: int | None = None) -> Tensor:
        """``start`` [rows]: each row's first real slot. Keys are the first ``n_keys`` slots (all by
        default: a fixed shape for the decoding step; a prefill needs only those up to its last)."""
        net = self.net
        rows, length = ids.shape
        n_keys = n_keys or self.k_cache[0].shape[2]
        positions = (slots[None, :] - start[:, None]).clamp(0, net.freqs_cis.shape[0] - 1)
        freqs = net.freqs_cis[positions]
        key = torch.arange(n_keys, device=ids.device)
        query = slots[None, :, None]
        mask = (key <= query) & ((key >= start[:, None, None]) | (key == query))  # [rows, len, keys]
        rep = self.n_head // self.n_kv
        # grouped-query attention without copying the cache: each kv head's queries as extra rows
        mask = mask[:, None, None].expand(rows, 1, rep, length, n_keys).reshape(rows, 1, rep * length, n_keys)
        x = net.tok_embeddings(ids)
        # additive once, not a boolean mask that attention would convert again in every layer
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        for block, k_cache, v_cache in zip(net.layers, self.k_cache, self.v_cache):
            attn = block.attention
            q, k, v = attn.wqkv(block.attention_norm(x)).split([q_size, kv_size, kv_size], dim=-1)
            q = gptfast.apply_rotary_emb(q.view(rows, length, self.n_head, self.head_dim), freqs)
            k = gptfast.apply_rotary_emb(k.view(rows, length, self.n_kv, self.head_dim), freqs)
            v = v.view(rows, length, self.n_kv, self.head_dim)
            k_rows, v_rows = k_cache[row0:row0 + rows], v_cache[row0:row0 + rows]
            k_rows.index_copy_(2, slots, k.transpose(1, 2))
            v_rows.index_copy_(2, slots, v.transpose(1, 2))
            q = q.transpose(1, 2).reshape(rows, self.n_kv, rep * length, self.head_dim)
            y = F.scaled_dot_product_attention(q, k_rows[:, :, :n_keys], v_rows[:, :, :n_keys], attn_mask=mask)
            # reshape: float32 attention may return a non-contiguous layout (bf16's flash kernel does not)
            y = y.reshape(rows, self.n_head, length, self.head_dim).transpose(1, 2).reshape(rows, length, q_size)
            x = x + attn.wo(y)
            x = x + block.feed_forward(block.ffn_norm(x))
        return net.output(net.norm(x[:, -1]))
