"""Greedy decoding with a KV cache equals the no-cache reference token for token (fp32)."""

from __future__ import annotations

import pytest
import torch

from evalsuite.measure.generate import generation_batches, greedy_decode, greedy_decode_uncached
from evalsuite.measure.lm_adapter import TorchLM
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")


def sharp_tiny_llama(seed: int = 4):
    """A tiny random Llama whose attention is sharp (scaled queries): its greedy outputs depend on
    positions and on every cached key, so a decoding bug changes them (the default init's near-uniform
    attention repeats one token whatever the positions)."""
    model = make_tiny_llama(seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.mlp.down_proj.weight.mul_(4.0)
    return model


def _prompts(seed: int, n: int, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("max_rows,max_tokens", [(1, 1 << 16), (3, 1 << 16), (64, 1 << 16), (64, 90)],
                         ids=["one_row", "three_rows", "all_rows", "token_budget"])
def test_cached_decoding_equals_the_no_cache_reference(max_rows, max_tokens):
    model = sharp_tiny_llama()
    prompts = _prompts(seed=1, n=9)
    limits = [int(x) for x in torch.randint(1, 20, (9,), generator=torch.Generator().manual_seed(2))]
    # a stop on a token some rows produce mid-batch, at different steps; EOS another one
    ref_free = greedy_decode_uncached(model, prompts, [20] * 9)
    common = [t for row in ref_free for t in row[2:6]]
    stop_token = max(set(common), key=common.count)
    eos = ref_free[0][3]

    def stop(rows, generated):
        return [g[-1] == stop_token for g in generated]

    got = greedy_decode(model, prompts, limits, eos_token_id=eos, stop=stop, max_rows=max_rows, max_tokens=max_tokens)
    ref = greedy_decode_uncached(model, prompts, limits, eos_token_id=eos, stop=stop)
    assert got == ref
    lengths = {len(g) for g in got}
    assert len(lengths) > 2  # rows stopped at different steps
    assert any(g[-1] == stop_token and len(g) < lim for g, lim in zip(got, limits))  # a stop mid-batch
    for g, lim in zip(got, limits):
        assert len(g) <= lim


def test_batches_are_length_sorted_within_budgets():
    lengths, new = [5, 30, 12, 30, 7], [10, 10, 10, 10, 10]
    batches = generation_batches(lengths, new, max_rows=2, max_tokens=10**6)
    assert [i for b in batches for i in b] == [1, 3, 2, 4, 0]
    assert all(len(b) <= 2 for b in batches)
    tight = generation_batches(lengths, new, max_rows=99, max_tokens=80)
    assert all(len(b) * max(lengths[i] + 10 for i in b) <= 80 or len(b) == 1 for b in tight)
    assert sorted(i for b in tight for i in b) == list(range(5))


def assert_reference_texts(model, tok, prompts, kwargs, got):
    """Each generation equals the no-cache reference's text, cut at its first stop string or EOS."""
    for prompt, kw, out in zip(prompts, kwargs, got):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        (ref,) = greedy_decode_uncached(model, [ids], [kw["max_gen_toks"]], eos_token_id=tok.eos_token_id)
        text = tok.decode(ref)
        for stop in kw["until"] + [tok.decode([tok.eos_token_id])]:
            text = text.split(stop)[0]
        assert out == text


def _instances(args_list):
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, args, i) for i, args in enumerate(args_list)]


def test_adapter_generation_honours_stop_strings_limits_and_matches_the_reference(smollm2):
    tok = smollm2.tokenizer
    prompts = ["Question: What is 2+2?\nAnswer:", "1, 2, 3, 4,", "The capital of France is"]
    kwargs = [{"until": ["\n"], "max_gen_toks": 8}, {"until": [" 7"], "max_gen_toks": 8},
              {"until": ["Question:"], "max_gen_toks": 3, "do_sample": False}]
    lm = TorchLM(smollm2.model, tok, device="cpu", batch_size=2)
    got = lm.generate_until(_instances(list(zip(prompts, kwargs))))
    assert_reference_texts(smollm2.model, tok, prompts, kwargs, got)
    assert got[1].startswith(" 5, 6") and " 7" not in got[1]
    assert not lm.generation_notes


def test_sampling_arguments_are_ignored_and_noted(tiny_llama):
    class Tok:
        eos_token_id, bos_token_id, is_fast = 0, None, False

        def __call__(self, strings, add_special_tokens=False):
            return {"input_ids": [[1 + (ord(c) % 200) for c in s] for s in strings]}

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(65 + i % 26) for i in ids)

    lm = TorchLM(tiny_llama, Tok(), device="cpu")
    (a,) = lm.generate_until(_instances([("abc", {"max_gen_toks": 4, "do_sample": True, "temperature": 0.7})]))
    (b,) = TorchLM(tiny_llama, Tok(), device="cpu").generate_until(_instances([("abc", {"max_gen_toks": 4})]))
    assert a == b and len(a) == 4
    assert lm.generation_notes == {"do_sample", "temperature"}


@pytest.mark.gpu
def test_gpu_cached_decoding_under_the_fused_forwards_equals_the_reference(smollm2_path):
    """On the GPU, in float32, with the fused modules the stages use: the cached batched decode gives
    the no-cache reference's tokens."""
    from evalsuite.load import load_model
    from evalsuite.load.fast_forward import fast_forward_all

    loaded = load_model(smollm2_path, device="cuda", dtype=torch.float32)
    tok = loaded.tokenizer
    texts = ["Question: What is 12 + 30?\nAnswer:", "The history of the Roman Empire", "def fibonacci(n):",
             "Once upon a time"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with fast_forward_all(loaded.model):
        got = greedy_decode(loaded.model, prompts, [40] * 4, eos_token_id=tok.eos_token_id, device="cuda", max_rows=3)
        ref = greedy_decode_uncached(loaded.model, prompts, [40] * 4, eos_token_id=tok.eos_token_id, device="cuda")
    assert got == ref


# ------------------------------------------------------------------ the static-KV-cache path

def varied_tiny_llama(seed: int = 4):
    """A sharp tiny Llama with an untied head: its greedy outputs vary from step to step (a tied head
    mostly repeats the last token), so a position or mask fault in cached decoding changes them."""
    model = make_tiny_llama(seed=seed, tie=False, layers=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.mlp.down_proj.weight.mul_(4.0)
    return model


def _stop_case(model, n=9):
    """Prompts, per-row limits, an EOS and a stop on a token that rows produce at different steps."""
    prompts = _prompts(seed=1, n=n)
    limits = [int(x) for x in torch.randint(4, 24, (n,), generator=torch.Generator().manual_seed(2))]
    free = greedy_decode_uncached(model, prompts, [24] * n)
    common = [t for row in free for t in row[2:9]]
    stop_token = max(set(common), key=common.count)
    eos = next(t for t in free[1][1:] if t != stop_token)

    def stop(rows, generated):
        return [g[-1] == stop_token for g in generated]

    return prompts, limits, eos, stop, stop_token


@pytest.mark.parametrize("stop_every", [1, 3, 8])
@pytest.mark.parametrize("max_rows,max_tokens", [(1, 1 << 16), (4, 1 << 16), (64, 1 << 16), (64, 150)],
                         ids=["one_row", "four_rows", "all_rows", "token_budget"])
def test_static_cache_decoding_equals_the_no_cache_reference(max_rows, max_tokens, stop_every):
    model = varied_tiny_llama()
    prompts, limits, eos, stop, stop_token = _stop_case(model)
    info: dict = {}
    got = greedy_decode(model, prompts, limits, eos_token_id=eos, stop=stop, max_rows=max_rows,
                        max_tokens=max_tokens, path="static", stop_every=stop_every, info=info)
    ref = greedy_decode_uncached(model, prompts, limits, eos_token_id=eos, stop=stop)
    assert info["path"] == "static" and "static_fallback" not in info
    assert got == ref
    ended = [len(g) for g, lim in zip(got, limits) if len(g) < lim]
    assert len(set(map(len, got))) > 3  # rows end at different steps
    assert any(g[-1] == stop_token for g, lim in zip(got, limits) if len(g) < lim)  # a stop mid-batch
    assert any(g[-1] == eos for g in got)  # and an EOS
    if stop_every > 1:  # some row ends inside a block of steps, not at its edge: the cut is exact
        assert any((n - 1) % stop_every for n in ended)


def test_static_cache_decoding_of_quantized_variants_equals_their_reference():
    import copy

    from evalsuite.quantize import parse_schemes, quantize_

    model = varied_tiny_llama()
    prompts, limits, eos, stop, _ = _stop_case(model, n=6)
    for cfg in parse_schemes("int8-wo,int4-wo-g32"):
        variant = quantize_(copy.deepcopy(model), cfg)
        info: dict = {}
        got = greedy_decode(variant, prompts, limits, eos_token_id=eos, stop=stop, path="static", stop_every=4, info=info)
        assert info["path"] == "static", (cfg.name, info)
        assert got == greedy_decode_uncached(variant, prompts, limits, eos_token_id=eos, stop=stop), cfg.name


@pytest.mark.parametrize("fault", ["position_offset", "pads_visible"])
def test_a_planted_static_cache_fault_changes_the_tokens(monkeypatch, fault):
    """The equality above can fail: a wrong position after the prompt, or pads left visible to the
    decoding steps, change the generations of a left-padded batch."""
    import evalsuite.load.static_cache as sc

    model = varied_tiny_llama()
    prompts = _prompts(seed=1, n=9)
    ref = greedy_decode_uncached(model, prompts, [16] * 9)
    original = sc.StaticCacheDecoder.forward

    def planted(self, ids, slots, start, row0=0, n_keys=None):
        if ids.shape[1] == 1:
            start = start - 1 if fault == "position_offset" else torch.zeros_like(start)
        return original(self, ids, slots, start, row0, n_keys)

    monkeypatch.setattr(sc.StaticCacheDecoder, "forward", planted)
    got = greedy_decode(model, prompts, [16] * 9, path="static")
    assert sum(a != b for a, b in zip(got, ref)) >= 3


def test_static_path_falls_back_where_its_decoder_does_not_match_the_model(monkeypatch):
    """A model the decoder cannot express is decoded by the DynamicCache path, and says why; so is one
    whose static-decoder logits fail the probe against the model's own forward, and one with a
    forward or hooks of its own that the decoder would not run."""
    import evalsuite.load.static_cache as sc

    model = varied_tiny_llama()
    prompts = _prompts(seed=3, n=4)
    ref = greedy_decode_uncached(model, prompts, [8] * 4)
    monkeypatch.setattr(sc.gptfast, "apply_rotary_emb", lambda x, freqs: x)  # a decoder without rotary
    info: dict = {}
    assert greedy_decode(model, prompts, [8] * 4, path="static", info=info) == ref
    assert info["path"] == "dynamic" and "probe" in info["static_fallback"]
    monkeypatch.undo()
    # a forward of the model's own (a wrapper, a hook) that the decoder would bypass: not bypassed
    wrapped = model.forward
    model.forward = lambda *a, **k: wrapped(*a, **k)
    info = {}
    assert greedy_decode(model, prompts, [8] * 4, path="static", info=info) == ref
    assert info["path"] == "dynamic" and "own forward" in info["static_fallback"]
    del model.forward
    handle = model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out)
    info = {}
    greedy_decode(model, prompts, [8] * 4, path="static", info=info)
    assert info["path"] == "dynamic" and "layers.0.mlp" in info["static_fallback"]
    handle.remove()
    model.config.model_type = "gemma"  # (1 + weight) norms: not what the gpt-fast blocks compute
    info = {}
    assert greedy_decode(model, prompts, [8] * 4, path="static", info=info) == ref
    assert info["path"] == "dynamic" and "gemma" in info["static_fallback"]


def test_adapter_generation_through_the_static_path_equals_the_reference(smollm2):
    """SmolLM2 in float32, through TorchLM.generate_until on the static path: the texts of the no-cache
    reference, stop strings and limits honoured per request."""
    tok = smollm2.tokenizer
    prompts = ["Question: What is 2+2?\nAnswer:", "1, 2, 3, 4,", "The capital of France is", "def f(x):\n   "]
    kwargs = [{"until": ["\n"], "max_gen_toks": 12}, {"until": [" 7"], "max_gen_toks": 12},
              {"until": ["Question:"], "max_gen_toks": 5}, {"until": ["\n\n"], "max_gen_toks": 12}]
    lm = TorchLM(smollm2.model, tok, device="cpu", batch_size=4)
    lm.generation_path = "static"
    got = lm.generate_until(_instances(list(zip(prompts, kwargs))))
    assert lm.generation_info["path"] == "static"
    assert_reference_texts(smollm2.model, tok, prompts, kwargs, got)
    assert got[1].startswith(" 5, 6") and " 7" not in got[1]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [None, "int8-wo", "int4-wo-g128"])
def test_gpu_static_path_under_the_fused_forwards_equals_the_reference(smollm2_path, scheme):
    """On the GPU, float32, under the fused forwards the tasks stage installs: the static path (CUDA
    graph replays, stop checks every 8 steps) gives the no-cache reference's tokens, for fp and the
    quantized variants."""
    import copy

    from evalsuite.load import load_model
    from evalsuite.load.fast_forward import fast_forward_all
    from evalsuite.quantize import parse_schemes, quantize_

    loaded = load_model(smollm2_path, device="cuda", dtype=torch.float32)
    model = loaded.model if scheme is None else quantize_(copy.deepcopy(loaded.model), parse_schemes(scheme)[0])
    tok = loaded.tokenizer
    texts = ["Question: What is 12 + 30?\nAnswer:", "The history of the Roman Empire", "def fibonacci(n):",
             "Once upon a time", "1, 2, 3,"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    limits = [40, 33, 40, 17, 40]

    def stop(rows, generated):
        return ["\n" in tok.decode(g[-4:]) for g in generated]

    info: dict = {}
    with fast_forward_all(model):
        got = greedy_decode(model, prompts, limits, eos_token_id=tok.eos_token_id, stop=stop, device="cuda", info=info)
        ref = greedy_decode_uncached(model, prompts, limits, eos_token_id=tok.eos_token_id, stop=stop, device="cuda")
    assert info["path"] == "static" and info.get("cuda_graph"), info
    assert got == ref


def test_static_path_takes_an_attention_output_in_any_memory_layout(monkeypatch):
    """CUDA's float32 attention kernels return [rows, heads, len, dim] laid out as [rows, len, heads,
    dim]: the decoder must not assume a contiguous output (it fell back to DynamicCache on the H200)."""
    import evalsuite.load.static_cache as sc

    real = sc.F.scaled_dot_product_attention

    def strided(*args, **kwargs):  # the same values, the memory of a transposed layout
        y = real(*args, **kwargs)
        return y.transpose(1, 2).contiguous().transpose(1, 2)

    model = varied_tiny_llama()
    prompts, limits, eos, stop, _ = _stop_case(model)
    ref = greedy_decode_uncached(model, prompts, limits, eos_token_id=eos, stop=stop)
    monkeypatch.setattr(sc.F, "scaled_dot_product_attention", strided)
    info: dict = {}
    got = greedy_decode(model, prompts, limits, eos_token_id=eos, stop=stop, path="static", stop_every=4, info=info)
    assert info["path"] == "static" and "static_fallback" not in info, info
    assert got == ref


def test_static_path_out_of_memory_decodes_the_rest_on_the_dynamic_path(monkeypatch):
    """A batch that does not fit after all (other processes share the device) is not lost: it and the
    batches after it are decoded on the DynamicCache path, stop checks still keyed by the prompt."""
    import evalsuite.measure.generate as gen

    model = varied_tiny_llama()
    prompts, limits, eos, _, _ = _stop_case(model)
    # each prompt stops on a token of its own (its third free-running one): a renumbering slip shows
    own_token = [g[2] for g in greedy_decode_uncached(model, prompts, [3] * len(prompts))]

    def keyed_stop(rows, generated):
        return [g[-1] == own_token[r] for r, g in zip(rows, generated)]

    calls = []
    original = gen._decode_batch_static

    def second_batch_oom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (planted)")
        return original(*args, **kwargs)

    monkeypatch.setattr(gen, "_decode_batch_static", second_batch_oom)
    info: dict = {}
    got = greedy_decode(model, prompts, limits, eos_token_id=eos, stop=keyed_stop, max_rows=3, path="static", info=info)
    ref = greedy_decode_uncached(model, prompts, limits, eos_token_id=eos, stop=keyed_stop)
    assert got == ref
    assert info["path"] == "dynamic" and "out of memory" in info["static_fallback"] and len(calls) == 2
    assert sum(g[-1] == own_token[r] and len(g) < lim for r, (g, lim) in enumerate(zip(ref, limits))) > 3
