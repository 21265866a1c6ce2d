"""A gpt-fast-style Llama model definition: loads gpt-fast ``model.pth`` checkpoints and gives the
speed stage named random-weight shapes (``llama-2-7b``, ...) without downloading weights.

Same parameter names as gpt-fast (``tok_embeddings``, ``layers.N.attention.wqkv``, ``output``),
interleaved rotary embeddings as in its converted checkpoints. ``forward(idx)`` runs full causal
attention for evaluation; after ``setup_caches`` a ``forward(idx, input_pos)`` decodes with a KV cache.

``random_model(name)`` builds a named shape with random weights (speed needs no trained weights);
``from_hf(model)`` runs a Hugging Face Llama-style model, quantized or not, through this decoder with a
static KV cache by reusing its modules, so every variant is timed by the same torch.compile-friendly code.
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


# the families whose blocks this decoder computes exactly (RMSNorm, SwiGLU, rotate-half rotary; Qwen2's
# q/k/v biases run in their projections)
LLAMA_TYPES = ("llama", "mistral", "qwen2")

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
    "tiny": dict(block_size=1024, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128, vocab_size=512),
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
        # the norm's weight has the run dtype even when a quantized head holds int8 codes
        dtype = self.norm.weight.dtype
        device = self.norm.weight.device
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
    inv_freq = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: n_elem // 2].float() / n_elem))
    return freqs_cis_from_inv_freq(seq_len, inv_freq)


def freqs_cis_from_inv_freq(seq_len: int, inv_freq: Tensor, scaling: float = 1.0) -> Tensor:
    """[seq_len, n_elem/2, 2] cos/sin table; ``scaling`` multiplies both (HF's attention_scaling)."""
    positions = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float().to(positions.device))
    cis = torch.polar(torch.full_like(freqs, float(scaling)), freqs)
    return torch.stack([cis.real, cis.imag], dim=-1)


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate ``x`` [batch, seq, heads, dim] by ``freqs_cis`` [seq, dim/2, 2], or [batch, seq, dim/2, 2]
    for positions that differ by row (left-padded batches)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(-1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1], xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


def random_model(name: str, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
                 std: float = 0.02) -> Transformer:
    """A ``Transformer`` of the named shape with N(0, std) weights and unit norms, built on the meta
    device and materialised once in ``dtype`` (a 7B shape never exists in float32)."""
    args = model_args(name)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.freqs_cis = precompute_freqs_cis(args.block_size, args.head_dim, args.rope_base).to(device)
    return model.eval().requires_grad_(False)


def _row_tensors(mod: nn.Module, rows: int) -> dict[str, Tensor] | None:
    """The module's own tensors if every one is indexed by output row first, else None."""
    tensors = {n: t for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
               if t is not None}
    if list(mod.children()) or not tensors or any(t.dim() == 0 or t.shape[0] != rows for t in tensors.values()):
        return None
    return tensors


def _with_rows(template: nn.Module, tensors: dict[str, Tensor], out_features: int) -> nn.Module:
    """A shallow copy of ``template`` holding ``tensors`` instead of its own (same forward)."""
    new = template.__class__.__new__(template.__class__)
    # an instance ``forward`` (fast_forward's patch) is bound to the template's own tensors: not copied
    new.__dict__ = {k: v for k, v in template.__dict__.items() if k != "forward"}
    new._parameters = {k: v for k, v in template._parameters.items()}
    new._buffers = {k: v for k, v in template._buffers.items()}
    new._modules = {}
    for k, t in tensors.items():
        if k in new._parameters:
            new._parameters[k] = nn.Parameter(t, requires_grad=False)
        else:
            new._buffers[k] = t
    new.out_features = out_features
    return new


def fuse_rows(mods: list[nn.Module]) -> nn.Module | None:
    """One linear-like module whose output is the concatenation of ``mods``' outputs.

    Works for any module whose tensors are all indexed by output row (``nn.Linear`` and the
    weight-only/dynamic quantized modules, whose scales are per row or per row and group); None otherwise.
    """
    parts = [_row_tensors(m, getattr(m, "out_features", -1)) for m in mods]
    if any(p is None for p in parts) or any(type(m) is not type(mods[0]) for m in mods):
        return None
    if any(p.keys() != parts[0].keys() for p in parts):
        return None
    fused = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return _with_rows(mods[0], fused, sum(m.out_features for m in mods))


def permute_rows(mod: nn.Module, index: Tensor) -> nn.Module | None:
    parts = _row_tensors(mod, getattr(mod, "out_features", -1))
    if parts is None:
        return None
    return _with_rows(mod, {k: t[index.to(t.device)] for k, t in parts.items()}, mod.out_features)


class ConcatOutputs(nn.Module):
    """``wqkv`` for projections whose weights cannot be sliced or concatenated (tensor subclasses
    such as torchao's): each runs its own forward, outputs are row-permuted and concatenated."""

    def __init__(self, mods: list[nn.Module], indices: list[Tensor | None]):
        super().__init__()
        self.parts = nn.ModuleList(mods)
        self.n_index = len(indices)
        for i, index in enumerate(indices):
            self.register_buffer(f"index{i}", index, persistent=False)
        self.out_features = sum(m.out_features for m in mods)

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for i, mod in enumerate(self.parts):
            y, index = mod(x), getattr(self, f"index{i}")
            outs.append(y if index is None else y[..., index])
        return torch.cat(outs, dim=-1)


def _fused_qkv(attn: nn.Module, q_index: Tensor, k_index: Tensor) -> nn.Module | None:
    try:
        q, k = permute_rows(attn.q_proj, q_index), permute_rows(attn.k_proj, k_index)
        return fuse_rows([q, k, attn.v_proj]) if q is not None and k is not None else None
    except (NotImplementedError, RuntimeError, TypeError):  # a weight type without slicing or cat
        return None


def _interleave_index(n_head: int, head_dim: int) -> Tensor:
    """Row order that turns HF's half-split rotary layout into gpt-fast's interleaved one
    (gpt-fast's convert_hf_checkpoint permutes q and k weights the same way)."""
    return torch.arange(n_head * head_dim).view(n_head, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def from_hf(hf_model: nn.Module) -> Transformer:
    """A gpt-fast ``Transformer`` over a Hugging Face Llama-style model's (possibly quantized) modules.

    The projections keep their module type, so an int8-wo or int4 layer runs its own forward; q, k
    and v are fused into ``wqkv`` (rows concatenated, q and k rows permuted to the interleaved rotary
    layout). Norms and the output head are shared, not copied. Raises EvalsuiteError for models
    this definition cannot express (qk-norm, sliding windows, non-Llama blocks).
    """
    cfg = hf_model.config
    base = getattr(hf_model, "model", None)
    layers = getattr(base, "layers", None)
    head = getattr(hf_model, "lm_head", None)
    rotary = getattr(base, "rotary_emb", None)
    name = type(hf_model).__name__
    if layers is None or head is None or rotary is None:
        raise EvalsuiteError(f"the speed stage needs a Llama-style model; {name} is not one (use --speed-model SHAPE)")
    kind = getattr(cfg, "model_type", None)
    if kind not in LLAMA_TYPES:  # e.g. Gemma (scaled embeddings, (1 + w) norms, GELU) or Phi-3 (fused qkv)
        raise EvalsuiteError(f"{name}: model type {kind!r} is not one the gpt-fast decoder computes exactly "
                             f"({', '.join(LLAMA_TYPES)})")
    if any(not all(isinstance(getattr(layer.self_attn, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj"))
           for layer in layers):
        raise EvalsuiteError(f"{name}: attention without separate q/k/v projections is not supported by the "
                             f"speed stage's decoder")
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    if head_dim * n_head != cfg.hidden_size or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise EvalsuiteError(f"{name}: head layout or sliding-window attention not supported by the speed stage's decoder")
    args = ModelArgs(block_size=int(getattr(cfg, "max_position_embeddings", 2048)), vocab_size=cfg.vocab_size,
                     n_layer=len(layers), n_head=n_head, dim=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     n_local_heads=n_kv, norm_eps=float(cfg.rms_norm_eps))
    with torch.device("meta"):
        model = Transformer(args)
    model.tok_embeddings = base.embed_tokens
    model.output = head
    model.norm = _norm(base.norm, args.norm_eps)
    q_index, k_index = _interleave_index(n_head, head_dim), _interleave_index(n_kv, head_dim)
    for block, layer in zip(model.layers, layers):
        attn, mlp = layer.self_attn, layer.mlp
        for needed in ("q_norm", "k_norm"):
            if getattr(attn, needed, None) is not None:
                raise EvalsuiteError(f"{name}: attention with {needed} is not supported by the speed stage's decoder")
        wqkv = _fused_qkv(attn, q_index, k_index)
        if wqkv is None:
            device = attn.q_proj.weight.device if isinstance(getattr(attn.q_proj, "weight", None), Tensor) else None
            wqkv = ConcatOutputs([attn.q_proj, attn.k_proj, attn.v_proj],
                                 [q_index.to(device), k_index.to(device), None])
        block.attention.wqkv, block.attention.wo = wqkv, attn.o_proj
        block.feed_forward.w1, block.feed_forward.w3, block.feed_forward.w2 = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        block.attention_norm = _norm(layer.input_layernorm, args.norm_eps)
        block.ffn_norm = _norm(layer.post_attention_layernorm, args.norm_eps)
    device = model.norm.weight.device
    model.freqs_cis = freqs_cis_from_inv_freq(args.block_size, rotary.inv_freq,
                                              getattr(rotary, "attention_scaling", 1.0)).to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise EvalsuiteError(f"{name}: could not map {leftover[0]} onto the gpt-fast decoder")
    return model.eval()


def _norm(hf_norm: nn.Module, eps: float) -> RMSNorm:
    norm = RMSNorm.__new__(RMSNorm)
    nn.Module.__init__(norm)
    norm.eps = getattr(hf_norm, "variance_epsilon", eps)
    norm.weight = hf_norm.weight
    return norm


def prefill(model: Transformer, idx: Tensor, input_pos: Tensor) -> Tensor:
    """Run the prompt through the KV cache; returns the greedy next token [batch, 1]."""
    logits = model(idx, input_pos)
    return logits[:, -1:].argmax(dim=-1)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor) -> Tensor:
    """One cached decoding step at position ``input_pos`` [1]; returns the greedy next token [batch, 1]."""
    logits = model(token, input_pos)
    return logits[:, -1:].argmax(dim=-1)


def greedy_decode(model: Transformer, prompt: Tensor, n_tokens: int) -> Tensor:
    """Greedy continuation of ``prompt`` [batch, len] by ``n_tokens`` tokens using the KV cache
    (``setup_caches`` must cover len + n_tokens). Returns the new tokens [batch, n_tokens]."""
    device = prompt.device
    pos = torch.arange(prompt.shape[1], device=device)
    token = prefill(model, prompt, pos)
    out = [token]
    input_pos = torch.tensor([prompt.shape[1]], device=device, dtype=torch.long)
    for _ in range(n_tokens - 1):
        token = decode_one_token(model, token, input_pos).clone()
        out.append(token)
        input_pos += 1
    return torch.cat(out, dim=1)
