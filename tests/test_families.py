"""Model families beyond Llama: Qwen2 (q/k/v biases), Mistral (sliding window), Gemma-2 (soft-capping,
scaled embeddings, (1 + w) norms), Gemma-3 (sliding windows, big vocabularies) and Phi-3 (fused qkv and
gate/up projections), tiny random-weight models built from their transformers configs. Each stage's
numbers equal a direct computation on the model's own transformers forward; the Llama-only fast paths
refuse what they do not compute, with the reason."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as T
from torch import nn

from evalsuite.load import gptfast
from evalsuite.measure import families
from evalsuite.measure import layer_capture as C
from evalsuite.measure import perplexity as P
from evalsuite.measure.lm_adapter import TorchLM
from evalsuite.quantize import Int8WeightOnlyConfig, quantize_
from tests.conftest import make_tiny_llama
from tests.test_layers import make_ctx, run_stage
from tests.test_lm_adapter import direct_loglikelihood, token_requests

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=8)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(head_dim=16, sliding_window=8, final_logit_softcapping=3.0,
                                                          attn_logit_softcapping=5.0)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(head_dim=16, sliding_window=8)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),
}


def make_family(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A random-weight model of the family; biases (Qwen2's q/k/v) random too, not the init's zeros."""
    config_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
        if type(m).__name__.endswith("RMSNorm"):  # Gemma's (1 + w) norms start at w = 0: make them count
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.1 + (0.0 if "Gemma" in type(m).__name__ else 1.0))
    return model


def _words(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def random_ids(n: int, length: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    """(family, fp model, its int8-wo copy)."""
    fp = make_family(request.param)
    return request.param, fp, quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())


def test_ppl_and_kld_equal_the_transformers_forward(pair):
    _, fp, q = pair
    ids = random_ids(1, 200).numpy()[0]
    windows = P.make_windows(ids, "", None, P.Protocol(context=40, max_windows=3), bos_id=1, decode=_words)
    got = P.measure_pass({"fp": fp, "int8-wo": q}, windows, torch.device("cpu"), batch_size=2)
    for w in range(len(windows)):
        x = windows.input_ids[w: w + 1]
        with torch.no_grad():
            lp = torch.log_softmax(fp(input_ids=x).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(q(input_ids=x).logits[0, :-1].double(), -1)
        first = int(windows.first[w]) - 1
        t = x[0, 1:, None]
        np.testing.assert_allclose(got.nll["fp"][w], -lp.gather(-1, t)[first:, 0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.nll["int8-wo"][w], -lq.gather(-1, t)[first:, 0].numpy(), rtol=1e-4, atol=1e-4)
        kld = (lp.exp() * (lp - lq)).sum(-1)[first:].clamp_min(0).numpy()
        np.testing.assert_allclose(got.pairs["int8-wo"]["kld"][w], kld, rtol=1e-3, atol=1e-6)
        assert float(kld.mean()) > 0  # the quantized model differs: a KLD of zero would test nothing


def test_task_loglikelihoods_equal_the_transformers_forward(pair):
    _, fp, _ = pair
    reqs = token_requests(n=5, vocab=VOCAB)
    lm = TorchLM(fp, None, device="cpu", batch_size=4)
    for (ll, greedy), (_, context, continuation) in zip(lm._loglikelihood_tokens(reqs), reqs):
        want, want_greedy = direct_loglikelihood(fp, context, continuation)
        assert ll == pytest.approx(want, rel=1e-5, abs=1e-4) and greedy == want_greedy


def test_layers_stage_equals_the_transformers_blocks(pair):
    """Hidden-state sums of each block as the transformers forward's own block outputs give them, and
    a whole stage run records a finite value for every quantized layer."""
    name, fp, q = pair
    ids = random_ids(2, 24, seed=5)
    with torch.inference_mode():
        _, block_sums = C.measure_activations(fp, {"q": q}, [ids], torch.device("cpu"))
        ref = fp(input_ids=ids, output_hidden_states=True).hidden_states
        test = q(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(block_sums["q"]) == 2
    # hidden_states[i + 1] is block i's output, except the last, which transformers gives after the final norm
    r, t = ref[1].double(), test[1].double()
    signal, noise, _, n = block_sums["q"][0].values()
    assert n == ids.numel()
    assert C.sqnr_db(signal, noise) == pytest.approx(10 * torch.log10((r**2).sum() / ((r - t) ** 2).sum()).item(), abs=0.01)
    results = run_stage(_layers_ctx(fp, q))
    rows = [r for r in results.records if r.metric == "output_sqnr_db"]
    assert rows and all(np.isfinite(r.value) for r in rows), name


def _layers_ctx(fp, q):
    from evalsuite.data import SMOKE_DIR

    return make_ctx(fp, {"int8-wo": q}, {"int8-wo": Int8WeightOnlyConfig()}, SMOKE_DIR, tokens=64, seq_len=32)


def test_int8_wo_keeps_qwen2_qkv_biases():
    fp = make_family("qwen2")
    q = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    for proj in ("q_proj", "k_proj", "v_proj"):
        ref, mod = fp.model.layers[0].self_attn.get_submodule(proj), q.model.layers[0].self_attn.get_submodule(proj)
        assert type(mod).__name__ != "Linear" and mod.bias is not None
        assert torch.equal(mod.bias, ref.bias) and ref.bias.abs().sum() > 0
    x = torch.randn(3, 64)
    lin = q.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(lin(x), x @ lin.dequantize().T + lin.bias, rtol=1e-5, atol=1e-5)


# which Llama-only fast path each family must refuse, and a word of the reason
REFUSED = {
    "llama": {},
    "qwen2": {"packed_tasks": "not Llama's code"},
    "mistral": {"packed_tasks": "not Llama's code", "static_cache": "sliding-window"},
    "gemma2": {"fused_kernels": "RMSNorm", "packed_tasks": "soft-capping", "static_cache": "gemma2"},
    "gemma3": {"fused_kernels": "RMSNorm", "packed_tasks": "sliding-window", "static_cache": "gemma3_text"},
    "phi3": {"fused_kernels": "SwiGLU", "packed_tasks": "not Llama's code", "static_cache": "phi3"},
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_fast_path_eligibility_of_each_family(name):
    model = make_tiny_llama(vocab_size=VOCAB) if name == "llama" else make_family(name)
    paths = families.fast_paths(model)
    assert set(paths) == set(families.PATHS)
    for path, line in paths.items():
        if path in REFUSED[name]:
            assert line.startswith("transformers forward: ") and REFUSED[name][path] in line, (path, line)
        else:
            assert line == "on GPU, where it applies", (path, line)
    run: dict = {}
    families.note(run, model)
    assert run["fast_paths"] == paths


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi3"])
def test_gpt_fast_decoder_refuses_what_it_does_not_compute(name):
    """The speed stage's decoder of a Hugging Face model: a clear error, never Llama's numbers."""
    from evalsuite.errors import EvalsuiteError

    with pytest.raises(EvalsuiteError, match="not one the gpt-fast decoder computes|sliding-window"):
        gptfast.from_hf(make_family(name, sliding_window=None) if name != "phi3" else make_family(name))


def test_gpt_fast_decoder_of_qwen2_keeps_biases_and_equals_transformers():
    fp = make_family("qwen2")
    net = gptfast.from_hf(fp)
    net.setup_caches(1, 32)
    ids = random_ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(net(ids, torch.arange(12)), fp(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_chunked_statistics_equal_unchunked_on_a_big_vocabulary(monkeypatch):
    """Gemma-3-like 32k vocabulary: the ppl pass's statistics cut into 1-row chunks equal those of one
    chunk (what the pass computed before chunking)."""
    fp = make_family("gemma3", vocab_size=32768)
    q = quantize_(copy.deepcopy(fp), Int8WeightOnlyConfig())
    ids = random_ids(1, 60, vocab=32768).numpy()[0]
    windows = P.make_windows(ids, "", None, P.Protocol(context=20, max_windows=3), bos_id=1, decode=_words)
    runs = {}
    for chunk in (1 << 30, 32768):
        monkeypatch.setattr(P, "STATS_CHUNK_ELEMENTS", chunk)
        assert len(P._row_chunks(19, 32768)) == (1 if chunk > 32768 * 19 else 19)
        runs[chunk] = P.measure_pass({"fp": fp, "int8-wo": q}, windows, torch.device("cpu"), batch_size=3)
    a, b = runs.values()
    for w in range(len(windows)):
        np.testing.assert_array_equal(a.nll["fp"][w], b.nll["fp"][w])
        for key, vals in a.pairs["int8-wo"].items():
            np.testing.assert_array_equal(vals[w], b.pairs["int8-wo"][key][w])
