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
    for prompt, kw, out in zip(prompts, kwargs, got):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        (ref,) = greedy_decode_uncached(smollm2.model, [ids], [kw["max_gen_toks"]], eos_token_id=tok.eos_token_id)
        text = tok.decode(ref)
        for s in kw["until"] + [tok.decode([tok.eos_token_id])]:
            text = text.split(s)[0]
        assert out == text
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
