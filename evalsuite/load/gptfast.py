"""A gpt-fast-style Llama model definition: loads gpt-fast ``model.pth`` checkpoints and gives the
speed stage named random-weight shapes (``llama-2-7b``, ...) without downloading weights.

Same parameter names as gpt-fast (``tok_embeddings``, ``layers.N.attention.wqkv``, ``output``),
interleaved rotary embeddings as in its converted checkpoints. ``forward(idx)`` runs full causal
attention for evaluation; after ``setup_caches`` a ``forward(idx, input_pos)`` decodes with a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evalsuite.errors import EvalsuiteError


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ModelArgs:
    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int | None = None
    n_local_heads: int = -1
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = _find_multiple(int(2 * 4 * self.dim / 3), 256)
        self.head_dim = self.dim // self.n_head


# Shapes by name; random weights of these shapes are what the speed stage times.
SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(n_layer=32, n_head=32, dim=4096, vocab_size=32000),
    "llama-2-13b": dict(n_layer=40, n_head=40, dim=5120, vocab_size=32000),
    "llama-3-8b": dict(block_size=8192, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                       intermediate_size=14336, vocab_size=128256, rope_base=500000.0),
    "mistral-7b": dict(block_size=8192, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                       intermediate_size=14336, vocab_size=32000, rope_base=1000000.0),
    "smollm2-135m": dict(block_size=8192, n_layer=30, n_head=9, n_local_heads=3, dim=576,
                         intermediate_size=1536, vocab_size=49152, rope_base=100000.0, tie_embeddings=True),
    "tiny": dict(block_size=256, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128, vocab_size=512),
}


def model_args(name: str) -> ModelArgs:
    if name not in SHAPES:
        raise EvalsuiteError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return ModelArgs(**SHAPES[name])


class KVCache(nn.Module):
    def __init__(self, batch: int, seq: int, n_heads: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, n_heads, seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        total = (args.n_head + 2 * args.n_local_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, total, bias=False)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = apply_rotary_emb(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(bsz, seqlen, self.n_local_heads, self.head_dim), freqs_cis)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        rep = self.n_head // self.n_local_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor | None, input_pos: Tensor | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.config = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.register_buffer("freqs_cis", precompute_freqs_cis(args.block_size, args.head_dim, args.rope_base),
                             persistent=False)

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocate KV caches for decoding; ``forward(idx, input_pos)`` then reads and fills them."""
        dtype = self.output.weight.dtype if self.output.weight.is_floating_point() else torch.bfloat16
        device = self.tok_embeddings.weight.device
        for block in self.layers:
            a = block.attention
            a.kv_cache = KVCache(max_batch_size, max_seq_length, a.n_local_heads, a.head_dim, dtype, device)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))

    def forward(self, idx: Tensor, input_pos: Tensor | None = None) -> Tensor:
        if input_pos is None:
            freqs_cis, mask = self.freqs_cis[: idx.shape[1]], None
        else:
            freqs_cis = self.freqs_cis[input_pos]
            mask = self.causal_mask[None, None, input_pos, : self.max_seq_length]
        x = self.tok_embeddings(idx)
        for block in self.layers:
            x = block(x, freqs_cis, mask, input_pos)
        return self.output(self.norm(x))


def precompute_freqs_cis(seq_len: int, n_elem: int, base: float) -> Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: n_elem // 2].float() / n_elem))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    cis = torch.polar(torch.ones_like(freqs), freqs)
    return torch.stack([cis.real, cis.imag], dim=-1)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1], xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)
