"""Fused forwards (evalsuite.load.fast_forward): each kernel against float64 and the eager module,
whole models with and without the patch, and the patch's restoration.

The kernels run under Triton's interpreter on the CPU
(``PYTHONPATH=/tmp/tritonlib TRITON_INTERPRET=1 python3 -m pytest tests/test_fast_forward.py``) or on
CUDA; without Triton the kernel tests skip and only the no-op behaviour is checked."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from evalsuite.app.config import RunConfig
from evalsuite.load import fast_forward as ff
from evalsuite.quantize.int8_wo import WeightOnlyInt8Linear
from tests.conftest import make_tiny_llama

DEVICE = "cuda" if torch.cuda.is_available() and not ff.INTERPRET else "cpu"
needs_kernels = pytest.mark.skipif(not ff.HAVE_TRITON or not (ff.INTERPRET or torch.cuda.is_available()),
                                   reason="needs Triton with CUDA or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.bfloat16]


def _llama():
    from transformers.models.llama import modeling_llama

    return modeling_llama


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Elementwise |got - want| <= bound (all float64 on the CPU), with the worst case in the message."""
    err = (got.double().cpu() - want.double().cpu()).abs()
    excess = err - bound.double().cpu()
    assert got.shape == want.shape and torch.isfinite(got.double()).all()
    worst = int(excess.argmax())
    assert excess.max() <= 0, f"{what}: |diff| {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"


# ---- RMSNorm

def _rms_norm_float64(x, weight, eps):
    """LlamaRMSNorm in float64, rounding the normalised value to x's dtype before the weight."""
    x64 = x.double()
    normed = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).double()
    return normed * weight.double()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 37), (7, 64), (1, 1, 200)])
def test_rms_norm_matches_float64_and_eager(dtype, shape):
    x = _rand(*shape, dtype=dtype, scale=3.0)
    norm = _llama().LlamaRMSNorm(shape[-1], eps=1e-5).to(device=DEVICE, dtype=dtype).requires_grad_(False)
    norm.weight.data = _rand(shape[-1], dtype=dtype, seed=1)
    got = ff.rms_norm(x, norm.weight, norm.variance_epsilon)
    want = _rms_norm_float64(x, norm.weight, 1e-5)
    # one rounding of the normalised value (may differ by one ulp from float64's) and one of the product
    bound = 2 * _eps(dtype) * want.abs() + 1e-30
    assert got.dtype == dtype
    assert_within(got, want, bound, "vs float64")
    with torch.no_grad():  # eager's float32 rstd has its own rounding: twice the bound
        assert_within(got, norm(x), 2 * bound, "vs eager LlamaRMSNorm")


@needs_kernels
def test_rms_norm_promotes_like_eager_for_float32_weight():
    x = _rand(4, 33, dtype=torch.bfloat16)
    norm = _llama().LlamaRMSNorm(33, eps=1e-6).to(DEVICE).requires_grad_(False)
    norm.weight.data = _rand(33, seed=2)
    got, eager = ff.rms_norm(x, norm.weight, 1e-6), norm(x)
    assert got.dtype == eager.dtype == torch.float32
    bound = 2 * _eps(torch.bfloat16) * eager.abs().double()
    assert_within(got, _rms_norm_float64(x, norm.weight, 1e-6), bound, "float32 weight")


@needs_kernels
def test_rms_norm_reads_strided_rows():
    base = _rand(6, 50, dtype=torch.float32)
    x = base[:, 5:45]  # rows 50 apart, last dim contiguous
    w = _rand(40, seed=3)
    want = _rms_norm_float64(x, w, 1e-5)
    assert_within(ff.rms_norm(x, w, 1e-5), want, 4 * _eps(torch.float32) * want.abs() + 1e-12, "strided")


# ---- rotary

def _rotary_float64(x, cos, sin):
    """Rotate-half rotary from first principles, in float64."""
    x, cos, sin = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    out = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
    magnitude = torch.cat(((x1 * c1).abs() + (x2 * s1).abs(), (x2 * c2).abs() + (x1 * s2).abs()), dim=-1)
    return out, magnitude


def _qk(bsz, n_q, n_k, seq, dim, dtype):
    """q and k as the attention module makes them: a [B, L, H, D] projection viewed as [B, H, L, D]."""
    q = _rand(bsz, seq, n_q, dim, dtype=dtype, seed=4).transpose(1, 2)
    k = _rand(bsz, seq, n_k, dim, dtype=dtype, seed=5).transpose(1, 2)
    return q, k


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,n_q,n_k,seq,dim,cos_batch",
                         [(2, 3, 1, 5, 16, 1), (1, 5, 5, 7, 10, 1), (3, 2, 2, 3, 8, 3)])
def test_rotary_matches_float64_and_eager(dtype, bsz, n_q, n_k, seq, dim, cos_batch):
    q, k = _qk(bsz, n_q, n_k, seq, dim, dtype)
    assert not q.is_contiguous()
    cos, sin = _rand(cos_batch, seq, dim, dtype=dtype, seed=6), _rand(cos_batch, seq, dim, dtype=dtype, seed=7)
    got_q, got_k = ff.rotary(q, k, cos, sin)
    eager_q, eager_k = _llama().apply_rotary_pos_emb(q, k, cos, sin)
    for got, eager, x in ((got_q, eager_q, q), (got_k, eager_k, k)):
        want, magnitude = _rotary_float64(x, cos.expand(bsz, seq, dim), sin.expand(bsz, seq, dim))
        assert got.dtype == dtype and got.stride() == x.stride()
        # float32 arithmetic, one rounding to the dtype
        assert_within(got, want, _eps(dtype) * want.abs() + 4 * _eps(torch.float32) * magnitude, "vs float64")
        # eager rounds each product and the sum
        assert_within(got, eager, 3 * _eps(dtype) * magnitude, "vs eager apply_rotary_pos_emb")


# ---- SwiGLU activation

@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 41), (2, 5, 129), (4099,)])
def test_silu_mul_matches_float64_and_eager(dtype, shape):
    gate, up = _rand(*shape, dtype=dtype, seed=8, scale=4.0), _rand(*shape, dtype=dtype, seed=9)
    got = ff.silu_mul(gate, up)
    want = F.silu(gate.double()) * up.double()
    assert got.dtype == dtype
    assert_within(got, want, _eps(dtype) * want.abs() + 8 * _eps(torch.float32) * want.abs() + 1e-30, "vs float64")
    assert_within(got, F.silu(gate) * up, 2 * _eps(dtype) * want.abs() + 1e-30, "vs eager")


# ---- the context manager on whole models

def _snapshot(model):
    """What fast_forward must restore: class forwards, instance dicts' forward, the modeling function."""
    llama = _llama()
    return (llama.apply_rotary_pos_emb, llama.LlamaRMSNorm.forward, llama.LlamaMLP.forward,
            llama.LlamaAttention.forward, [("forward" in m.__dict__) for m in model.modules()])


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of the three fused kernels' wrappers (proves the fused path ran)."""
    calls = {"rms_norm": 0, "rotary": 0, "silu_mul": 0}
    for name in calls:
        real = getattr(ff, name)

        def wrapper(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(ff, name, wrapper)
    return calls


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_llama_logits_match_inside_fast_forward(dtype, counted):
    ref32 = make_tiny_llama(layers=2).to(DEVICE)
    model = copy.deepcopy(ref32).to(dtype)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    before = _snapshot(model)
    with torch.no_grad():
        exact = ref32(ids).logits.double()
        eager = model(ids).logits.double()
        with ff.fast_forward(model) as n:
            fused = model(ids).logits.double()
    # 2 layers x (2 norms + MLP + attention) + final norm
    assert n == 9
    assert counted == {"rms_norm": 5, "rotary": 2, "silu_mul": 2}
    assert _snapshot(model) == before
    if dtype == torch.float32:
        assert (fused - eager).abs().max() <= 1e-5 * eager.abs().max()
    else:  # bf16: the fused model is no further from fp32 than eager bf16 is
        err_fused, err_eager = (fused - exact).abs().mean(), (eager - exact).abs().mean()
        assert err_fused <= 1.5 * err_eager, (err_fused, err_eager)
        assert (fused - eager).abs().max() <= 0.05 * exact.abs().max()


@needs_kernels
def test_everything_is_restored_after_an_exception(tiny_llama):
    before = _snapshot(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"):
        with ff.fast_forward(tiny_llama) as n:
            assert n > 0 and _llama().apply_rotary_pos_emb is not before[0]
            raise RuntimeError("boom")
    assert _snapshot(tiny_llama) == before


@needs_kernels
def test_nested_blocks_restore_in_order(tiny_llama):
    before = _snapshot(tiny_llama)
    other = make_tiny_llama(seed=1)
    with ff.fast_forward(tiny_llama) as outer:
        with ff.fast_forward(other) as inner:
            assert inner == outer == 9
        patched = _llama().apply_rotary_pos_emb
        assert patched is not before[0] and hasattr(patched, ff._FUSED_MARK)
        assert all("forward" not in m.__dict__ for m in other.modules())
    assert _snapshot(tiny_llama) == before


@needs_kernels
def test_cpu_tensors_take_the_eager_path_without_the_interpreter(tiny_llama, counted, monkeypatch):
    from evalsuite.kernels import llama_fused

    monkeypatch.setattr(llama_fused, "INTERPRET", False)  # the guard (kernels_apply) lives with the kernels
    ids = torch.arange(12).view(2, 6)
    tiny_llama.cpu()
    with torch.no_grad():
        eager = tiny_llama(ids).logits
        with ff.fast_forward(tiny_llama):
            inside = tiny_llama(ids).logits
    assert torch.equal(eager, inside)
    assert counted == {"rms_norm": 0, "rotary": 0, "silu_mul": 0}


@needs_kernels
def test_tensors_needing_gradients_take_the_eager_path(counted):
    model = make_tiny_llama().to(DEVICE).requires_grad_(True)
    ids = torch.arange(12, device=DEVICE).view(2, 6)
    with ff.fast_forward(model):
        model(ids).logits.sum().backward()
    assert counted == {"rms_norm": 0, "rotary": 0, "silu_mul": 0}
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None


@needs_kernels
def test_quantized_linears_keep_the_fused_mlp(tiny_llama):
    from evalsuite.quantize import parse_schemes, quantize_

    (scheme,) = parse_schemes("int8-wo")
    model = quantize_(copy.deepcopy(tiny_llama), scheme).to(DEVICE)
    ids = torch.arange(14, device=DEVICE).view(2, 7)
    with torch.no_grad():
        eager = model(ids).logits
        with ff.fast_forward(model) as n:
            fused = model(ids).logits
    int8_linears = sum(type(m) is WeightOnlyInt8Linear for m in model.modules())
    assert int8_linears > 0 and n == 9 + int8_linears
    assert (fused - eager).abs().max() <= 1e-5 * eager.abs().max()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_dequantizes_first_within_rounding(dtype, bias):
    """The fused int8-wo linear is F.linear(x, W_int8 * s): the seed's values within the dtype's
    rounding, from the same int8 weights and scales, and it is the forward that runs."""
    from torch import nn

    from evalsuite.quantize import parse_schemes, quantize_

    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=gen) * torch.logspace(-2, 0, 48)[:, None])
        if bias:
            lin.bias.copy_(torch.randn(48, generator=gen))
    (scheme,) = parse_schemes("int8-wo")
    model = quantize_(nn.Sequential(lin).to(dtype), scheme).to(DEVICE)
    q = model[0]
    assert type(q) is WeightOnlyInt8Linear
    x = torch.randn(3, 5, 64, generator=gen).to(DEVICE, dtype)
    with torch.no_grad():
        seed = q(x).float()
        exact = x.double() @ (q.weight.double() * q.scales.double()[:, None]).T
        if bias:
            exact = exact + q.bias.double()
        with ff.fast_forward(model) as n:
            fused = q(x).float()
    assert n == 1
    scale = exact.abs().max().item()
    ulp = torch.finfo(dtype).eps
    assert (fused.double() - exact).abs().max().item() <= 4 * ulp * scale
    assert (fused - seed).abs().max().item() <= 8 * ulp * scale
    if dtype == torch.float32:
        assert (fused - seed).abs().max().item() <= 1e-5 * scale


def test_without_triton_nothing_is_patched(tiny_llama, monkeypatch):
    monkeypatch.setattr(ff, "HAVE_TRITON", False)
    before = _snapshot(tiny_llama)
    with ff.fast_forward(tiny_llama) as n:
        assert n == 0 and _snapshot(tiny_llama) == before


def test_other_conventions_are_left_alone():
    from torch import nn

    class OlmoStyleRMSNorm(nn.Module):  # weight applied before the cast: other numerics
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, x):
            xf = x.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight * xf * rstd).to(x.dtype)

    def interleaved(q, k, cos, sin):
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return q * cos.unsqueeze(1) + rot(q) * sin.unsqueeze(1), k * cos.unsqueeze(1) + rot(k) * sin.unsqueeze(1)

    assert ff._norm_eps(OlmoStyleRMSNorm()) is None
    assert ff._norm_eps(_llama().LlamaRMSNorm(8)) == 1e-6
    assert not ff._is_rotate_half_rotary(interleaved)
    assert ff._is_rotate_half_rotary(_llama().apply_rotary_pos_emb)


@needs_kernels
def test_gptfast_rms_norm_is_fused_and_nothing_else():
    from evalsuite.load import gptfast

    model = gptfast.Transformer(gptfast.model_args("tiny")).eval().to(DEVICE)
    for m in model.modules():
        if isinstance(m, gptfast.RMSNorm):
            m.weight.data = _rand(m.weight.numel(), seed=10)
    ids = torch.arange(10, device=DEVICE).view(1, 10)
    with torch.no_grad():
        eager = model(ids)
        with ff.fast_forward(model) as n:
            fused = model(ids)
    assert n == sum(isinstance(m, gptfast.RMSNorm) for m in model.modules()) == 2 * 2 + 1
    assert (fused - eager).abs().max() <= 1e-5 * eager.abs().max()
    assert all("forward" not in m.__dict__ for m in model.modules())


# ---- on a GPU

@pytest.mark.gpu
@needs_kernels
def test_rms_norm_rounds_like_eager_on_cuda():
    """Same structure as LlamaRMSNorm (round, then weight): bit-identical except where the float32
    sum order moves the normalised value across a bf16 rounding boundary (rare)."""
    x = _rand(256, 576, dtype=torch.bfloat16, scale=3.0)
    norm = _llama().LlamaRMSNorm(576, eps=1e-5).to(device=DEVICE, dtype=torch.bfloat16).requires_grad_(False)
    norm.weight.data = _rand(576, dtype=torch.bfloat16, seed=1)
    same = (ff.rms_norm(x, norm.weight, 1e-5) == norm(x)).double().mean()
    assert same >= 0.99, same


@pytest.mark.gpu
@needs_kernels
def test_smollm2_bf16_logits_and_nll_match_on_cuda(smollm2_path, data_dir):
    from evalsuite.load import load_model
    from evalsuite.measure.corpus import wikitext

    cuda = torch.device("cuda")
    loaded = load_model(smollm2_path, device=cuda, dtype=torch.bfloat16)
    model, tok = loaded.model, loaded.tokenizer
    ref32 = load_model(smollm2_path, device=cuda, dtype=torch.float32).model
    text = wikitext("test", data_dir)[0][:20000]
    ids = torch.tensor(tok(text)["input_ids"][:2048], device=cuda).view(1, -1)
    with torch.no_grad():
        exact = ref32(ids).logits.float()
        eager = model(ids).logits.float()
        with ff.fast_forward(model) as n:
            fused = model(ids).logits.float()
        again = model(ids).logits.float()
    assert n == 30 * 4 + 1
    assert torch.equal(eager, again)

    def nll(logits):
        return F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()

    # mean NLL over 2047 tokens: bf16 moves it by ~1e-3 nats (measured on an H100: fp32 2.59664, eager
    # bf16 2.59511, fused bf16 2.59635), so bound the fused model's distance from fp32 by eager's, not
    # fused against eager; a wrong kernel moves it by whole nats
    nlls = nll(fused), nll(eager), nll(exact)
    assert abs(nlls[0] - nlls[2]) <= 2 * abs(nlls[1] - nlls[2]) + 5e-4, nlls
    # bf16 noise: fused is no further from the fp32 model than eager bf16 is
    err_fused, err_eager = (fused - exact).abs(), (eager - exact).abs()
    assert err_fused.mean() <= 1.25 * err_eager.mean(), (err_fused.mean(), err_eager.mean())
    assert err_fused.max() <= 2 * err_eager.max(), (err_fused.max(), err_eager.max())


@needs_kernels
@pytest.mark.parametrize("kernels, expected", [("fused", 18), ("eager", 0)])
def test_run_context_fuses_every_variant_unless_eager(tiny_llama, kernels, expected):
    """RunContext.fused_forwards: fast_forward over each model given (None skipped), or nothing
    under --kernels eager; all restored afterwards."""

    from evalsuite.measure.context import RunContext

    other = copy.deepcopy(tiny_llama)
    ctx = RunContext(loaded=None, variants={}, configs={}, device=torch.device(DEVICE), dtype=torch.float32,
                     config=RunConfig.of_options(kernels=kernels), results=None)
    before = (_snapshot(tiny_llama), _snapshot(other))
    with ctx.fused_forwards(tiny_llama, None, other) as n:
        assert n == expected
    assert (_snapshot(tiny_llama), _snapshot(other)) == before
