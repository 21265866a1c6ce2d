"""The fast lm-eval adapter: log-likelihoods equal a direct float64 computation and lm-eval's HFLM."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from evalsuite.measure.lm_adapter import TorchLM
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")


def direct_loglikelihood(model: nn.Module, context: list[int], continuation: list[int], max_length: int = 10**9):
    """Sum of log p(continuation token | all before), float64, one unbatched forward; and greedy."""
    whole = (context + continuation)[-(max_length + 1):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(continuation)
    positions = range(len(whole) - 1 - n, len(whole) - 1)
    total = sum(logprobs[p, whole[p + 1]].item() for p in positions)
    greedy = all(logits[p].argmax().item() == whole[p + 1] for p in positions)
    return total, greedy


class LogitsOnly(nn.Module):
    """A model without ``logits_to_keep``: the adapter must take the full-logits path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.inner(input_ids=input_ids).logits)


def token_requests(seed: int = 0, n: int = 9, vocab: int = 256):
    """Requests of varied lengths, two sharing a model input (same context, one-token continuations)."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n):
        ctx = torch.randint(0, vocab, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        cont = torch.randint(0, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        reqs.append(((f"c{i}", "x"), ctx, cont))
    reqs.append((("shared", "a"), reqs[0][1], [7]))
    reqs.append((("shared", "b"), reqs[0][1], [8]))
    return reqs


@pytest.mark.parametrize("wrap", [False, True], ids=["head_hook", "full_logits"])
def test_tiny_model_matches_direct_computation(wrap):
    model = make_tiny_llama()
    lm_model = LogitsOnly(model) if wrap else model
    reqs = token_requests()
    got = TorchLM(lm_model, tokenizer=None, device="cpu", batch_size=4)._loglikelihood_tokens(reqs)
    for (_, ctx, cont), (ll, greedy) in zip(reqs, got):
        ref, ref_greedy = direct_loglikelihood(model, ctx, cont)
        assert ll == pytest.approx(ref, abs=1e-4)
        assert greedy == ref_greedy


def test_batching_and_padding_do_not_change_results():
    model = make_tiny_llama(seed=1)
    reqs = token_requests(seed=3, n=12)
    one = TorchLM(model, None, device="cpu", batch_size=1)._loglikelihood_tokens(reqs)
    many = TorchLM(model, None, device="cpu", batch_size=64)._loglikelihood_tokens(reqs)
    budget = TorchLM(model, None, device="cpu", batch_size=64, batch_tokens=50)._loglikelihood_tokens(reqs)
    for a, b, c in zip(one, many, budget):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[0] == pytest.approx(c[0], abs=1e-4)
        assert a[1] == b[1] == c[1]


def test_long_inputs_are_truncated_from_the_left():
    model = make_tiny_llama(seed=2)
    ctx, cont = list(range(100)), [5, 6, 7]
    (ll, _), = TorchLM(model, None, device="cpu", max_length=16)._loglikelihood_tokens([(("a", "b"), ctx, cont)])
    ref, _ = direct_loglikelihood(model, ctx, cont, max_length=16)
    assert ll == pytest.approx(ref, abs=1e-4)
    assert not math.isclose(ll, direct_loglikelihood(model, ctx, cont)[0], abs_tol=1e-4)


def _instances(req_type, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(req_type, {}, args, i) for i, args in enumerate(args_list)]


REQUESTS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " The city of London"),
    ("The cat sat on the ", "mat."),  # trailing space moves to the continuation
    ("", "Hello world"),  # empty context: the prefix token conditions the first token
]


def test_smollm2_matches_direct_computation(smollm2):
    tok = smollm2.tokenizer
    got = TorchLM(smollm2.model, tok, device="cpu", batch_size=3).loglikelihood(_instances("loglikelihood", REQUESTS))
    for (context, continuation), (ll, greedy) in zip(REQUESTS, got):
        if context:
            stripped = context.rstrip()
            ctx = tok(stripped, add_special_tokens=False)["input_ids"]
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        else:
            ctx = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
            whole = ctx + tok(continuation, add_special_tokens=False)["input_ids"]
        ref, ref_greedy = direct_loglikelihood(smollm2.model, ctx, whole[len(ctx):])
        assert ll == pytest.approx(ref, abs=1e-3)
        assert greedy == ref_greedy


def test_smollm2_rolling_and_generation(smollm2):
    tok = smollm2.tokenizer
    lm = TorchLM(smollm2.model, tok, device="cpu", max_length=8)
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day."
    (total,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    # disjoint windows of 8 predicted tokens, each conditioned on exactly the tokens in its window
    ref = 0.0
    for start in range(1, len(ids), 8):
        n = min(8, len(ids) - start)
        window = ids[max(0, start + n - 9):start + n]
        ref += direct_loglikelihood(smollm2.model, window[:len(window) - n], window[len(window) - n:])[0]
    assert total == pytest.approx(ref, abs=1e-3)

    prompt = "Question: What is 2+2?\nAnswer:"
    (out,) = TorchLM(smollm2.model, tok, device="cpu").generate_until(
        _instances("generate_until", [(prompt, {"until": ["\n"], "max_gen_toks": 6})]))
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for _ in range(6):  # independent greedy decode
        nxt = int(smollm2.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
    expected = tok.decode(ids[len(tok(prompt, add_special_tokens=False)["input_ids"]):]).split("\n")[0]
    assert out == expected


MIRRORED = ["arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai", "boolq", "copa", "openbookqa"]


@pytest.mark.parametrize("task_name", MIRRORED)
def test_same_answers_as_lm_eval_hflm(task_name, smollm2, data_dir):
    """A few items of each mirrored task: per-item log-likelihoods within 1e-3 nats of HFLM's and
    the same per-item metric values."""
    from lm_eval.models.huggingface import HFLM

    from evalsuite.measure import tasks as stage

    tm = stage.task_manager(stage.task_dirs(), data_dir)
    task = stage.load_task(tm, task_name)
    by_doc = stage.build_requests(task, limit=1 if task_name in ("boolq", "lambada_openai", "arc_challenge") else 2)
    fast = {}
    fast_ll = {}
    for packed in (False, True):  # padded batches, and packed ones (masked-attention reference on CPU)
        lm = TorchLM(smollm2.model, smollm2.tokenizer, device="cpu", packed=packed)
        fast[packed] = stage.run_model(lm, task, by_doc)
        fast_ll[packed] = stage.loglikelihoods(by_doc)
    hf = HFLM(pretrained=smollm2.model, tokenizer=smollm2.tokenizer, batch_size=4, device="cpu")
    ref = stage.run_model(hf, task, by_doc)
    ref_ll = stage.loglikelihoods(by_doc)
    for packed in (False, True):
        for a, b in zip(fast_ll[packed], ref_ll):
            assert a == pytest.approx(b, rel=2e-5, abs=1e-3)  # fp32 sums over ~30 tokens
        for doc_id in fast[packed]:
            for metric in ("acc", "acc_norm"):
                if metric in fast[packed][doc_id]:
                    assert fast[packed][doc_id][metric] == ref[doc_id][metric]


@pytest.mark.gpu
def test_bf16_on_gpu_agrees_with_fp32_and_with_itself_across_batchings(smollm2):
    """In bf16 the batch shape changes rounding, not answers.

    Bounds come from measurement, not hope: on an H100/H200 the bf16-vs-fp32 noise floor is a mean
    per-token KLD of 0.001 nats (benchmarks/RESULTS.md), i.e. per-token log-prob noise of roughly
    sqrt(2 * 0.001) = 0.045 nats, so a multi-token continuation moves by ~0.1-0.2 nats (0.21 was
    seen). Batch 1 vs 256 moved one continuation by 0.06 nats. A padding or position bug moves
    log-likelihoods by whole nats."""
    import copy

    model = copy.deepcopy(smollm2.model).to("cuda", torch.bfloat16)
    insts = _instances("loglikelihood", REQUESTS * 3)
    ref = TorchLM(smollm2.model, smollm2.tokenizer, device="cpu").loglikelihood(insts)
    one = TorchLM(model, smollm2.tokenizer, device="cuda", batch_size=1, packed=False).loglikelihood(insts)
    many = TorchLM(model, smollm2.tokenizer, device="cuda", batch_size=256, packed=False).loglikelihood(insts)
    packed_lm = TorchLM(model, smollm2.tokenizer, device="cuda")  # automatic: packed, flash varlen attention
    packed = packed_lm.loglikelihood(insts)
    assert packed_lm._packed_forward() is not None and packed_lm._packed.attention == "varlen"
    for other in (many, packed):
        batch_diff = [abs(a - b) for (a, _), (b, _) in zip(one, other)]
        assert max(batch_diff) < 0.25 and sum(batch_diff) / len(batch_diff) < 0.1
    for got in (one, packed):
        fp32_diff = [abs(a - r) for (a, _), (r, _) in zip(got, ref)]
        assert max(fp32_diff) < 0.6 and sum(fp32_diff) / len(fp32_diff) < 0.25


def multiple_choice_requests(seed: int = 0):
    """Requests as multiple-choice tasks make them: several continuations (of 1-4 tokens) after one
    context, a context repeated in another item, and the rest of :func:`token_requests`."""
    g = torch.Generator().manual_seed(seed)
    reqs = token_requests(seed=seed)
    for item in range(3):
        ctx = torch.randint(0, 256, (12 + 5 * item,), generator=g).tolist()
        for choice in range(4):
            cont = torch.randint(0, 256, (1 + (choice + item) % 4,), generator=g).tolist()
            reqs.append(((f"mc{item}", str(choice)), ctx, cont))
    reqs.append((("again", "0"), reqs[-1][1], [9, 9]))  # the last item's context, a fresh continuation
    return reqs


@pytest.mark.parametrize("budget", [None, 24], ids=["one_batch", "many_batches"])
def test_packed_batches_equal_padded_ones_and_the_direct_computation(budget):
    """Prefixes computed once, their continuations packed after them (masked-attention reference on
    CPU): the same log-likelihoods and greedy flags as padded batches and as one forward per request,
    also with left truncation."""
    model = make_tiny_llama(seed=6)
    reqs = multiple_choice_requests()
    for max_length in (None, 16):
        packed = TorchLM(model, None, device="cpu", packed=True, batch_tokens=budget, max_length=max_length)
        got = packed._loglikelihood_tokens(reqs)
        padded = TorchLM(model, None, device="cpu", packed=False, max_length=max_length)._loglikelihood_tokens(reqs)
        for (_, ctx, cont), (ll, greedy), (ll_pad, greedy_pad) in zip(reqs, got, padded):
            ref, ref_greedy = direct_loglikelihood(model, ctx, cont, max_length=max_length or 10**9)
            assert ll == pytest.approx(ref, abs=1e-4) and ll == pytest.approx(ll_pad, abs=1e-4)
            assert greedy == ref_greedy == greedy_pad
        plan = packed._plan(reqs)
        assert (len(plan.batches) > 1) == (budget is not None)


def test_packed_plan_computes_each_prefix_once():
    """One context and four continuations cost the context once plus each continuation but its last
    token; each continuation's keys are the context's slots and its own."""
    from evalsuite.measure.batch_plan import PackedBatch

    ctx = list(range(10, 30))
    conts = [[1], [2, 3], [4, 5, 6], [7, 8, 9, 10]]
    lm = TorchLM(make_tiny_llama(), None, device="cpu", packed=True)
    (batch,) = lm._plan([((str(k), ""), ctx, c) for k, c in enumerate(conts)]).batches
    assert isinstance(batch, PackedBatch)
    assert len(batch.ids) == len(ctx) + sum(len(c) - 1 for c in conts)
    assert batch.ids.tolist() == ctx + [7, 8, 9] + [4, 5] + [2]  # the longest suffix after the context
    assert batch.cu_q.tolist() == [0, 23, 25, 26]  # the empty suffix has no segment
    assert batch.positions[23:].tolist() == [20, 21, 20]
    assert batch.key_index[batch.cu_k[1]:batch.cu_k[2]].tolist() == list(range(20)) + [23, 24]
    assert batch.key_index[batch.cu_k[2]:].tolist() == list(range(20)) + [25]
    assert sorted(batch.owners) == [0, 1, 2, 3]
    # the one-token continuation reads the context's last slot only
    k = batch.owners.index(0)
    assert batch.scored[batch.flat_rows[batch.owner == k]].tolist() == [19]


def test_packed_forwards_need_a_llama_model_and_stay_off_on_cpu_by_default():
    from evalsuite.errors import EvalsuiteError

    model = make_tiny_llama()
    assert TorchLM(model, None, device="cpu")._packed_forward() is None  # automatic: GPU only
    with pytest.raises(EvalsuiteError, match="Llama-architecture"):
        TorchLM(LogitsOnly(model), None, device="cpu", packed=True)._packed_forward()


def test_a_packed_forward_that_disagrees_with_the_model_is_not_used(monkeypatch):
    """The probe compares packed logits with the model's own forward before trusting them: a packed
    attention that lets tokens see the future fails it."""
    from evalsuite.measure import packed as packed_mod

    model = make_tiny_llama()
    lm = TorchLM(model, None, device="cpu")
    forward = packed_mod.packed_forward(model)
    assert lm._probe_packed(forward)
    monkeypatch.setattr(packed_mod, "segment_causal_mask",
                        lambda cu_q, cu_k: torch.ones(int(cu_q[-1]), int(cu_k[-1]), dtype=torch.bool))
    assert not lm._probe_packed(forward)


def test_the_automatic_packed_choice_is_probed_once_per_model(monkeypatch):
    """The stage makes an adapter per task and variant; the probe (a forward and a device sync) runs
    once per model and setting, not for each."""
    from evalsuite.measure import packed as packed_mod

    def as_if_on_gpu(model):  # the masked reference, labelled as the GPU's choice
        forward = packed_mod.PackedForward(model, "masked")
        forward.attention = "varlen"
        return forward

    monkeypatch.setattr(packed_mod, "packed_forward", as_if_on_gpu)
    probes = []
    probe = TorchLM._probe_packed
    monkeypatch.setattr(TorchLM, "_probe_packed", lambda self, f: probes.append(1) or probe(self, f))
    model, other = make_tiny_llama(seed=1), make_tiny_llama(seed=2)
    reqs = multiple_choice_requests()
    first = TorchLM(model, None, device="cpu")._loglikelihood_tokens(reqs)
    assert TorchLM(model, None, device="cpu")._loglikelihood_tokens(reqs) == first
    assert TorchLM(model, None, device="cpu")._packed_forward() is not None and len(probes) == 1
    TorchLM(other, None, device="cpu")._packed_forward()
    model.double()
    TorchLM(model, None, device="cpu")._packed_forward()
    assert len(probes) == 3


def test_scored_row_cap_does_not_change_results():
    model = make_tiny_llama(seed=4)
    reqs = token_requests(seed=5, n=10)
    capped = TorchLM(model, None, device="cpu")
    capped.scored_rows = 3
    free = TorchLM(model, None, device="cpu")._loglikelihood_tokens(reqs)
    for (a, ga), (b, gb) in zip(capped._loglikelihood_tokens(reqs), free):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_gpt_fast_model_matches_direct_computation():
    """A gpt-fast Transformer (its head is ``output``; it returns logits, not an output object)."""
    from evalsuite.load import gptfast

    torch.manual_seed(0)
    model = gptfast.Transformer(gptfast.ModelArgs(block_size=64, vocab_size=256, n_layer=2, n_head=4, dim=32)).eval()
    reqs = token_requests(seed=6, n=6)
    lm = TorchLM(model, None, device="cpu", batch_size=4)
    assert lm.max_length == 64 and lm._head is model.output
    for (_, ctx, cont), (ll, greedy) in zip(reqs, lm._loglikelihood_tokens(reqs)):
        whole = ctx + cont
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), dim=-1)
        positions = range(len(ctx) - 1, len(whole) - 1)
        assert ll == pytest.approx(sum(logprobs[p, whole[p + 1]].item() for p in positions), abs=1e-4)
        assert greedy == all(logprobs[p].argmax().item() == whole[p + 1] for p in positions)


@pytest.mark.parametrize("width, hidden", [(1536, 576), (11008, 4096), (53248, 16384), (None, 8192), (256, 64)])
def test_gpu_token_budget_keeps_the_largest_activation_near_2_gib(width, hidden):
    from types import SimpleNamespace

    from evalsuite.measure.batch_plan import ACTIVATION_BYTES, gpu_batch_tokens

    tokens = gpu_batch_tokens(SimpleNamespace(intermediate_size=width, hidden_size=hidden))
    mlp = width or 4 * hidden
    assert 8192 <= tokens <= 262_144 and tokens % 1024 == 0
    assert tokens == 8192 or tokens * mlp * 2 <= ACTIVATION_BYTES  # never above the budget unless at the floor
    assert tokens == 262_144 or (tokens + 1024) * mlp * 2 > ACTIVATION_BYTES  # and not far below it


# ------------------------------------------------------------------ batch plan
def _plan_cost(lengths, plan, min_cost, attention_width):
    return sum(max(min_cost, (e - s) * lengths[s] * (1 + lengths[s] / attention_width)) for s, e in plan)


def _greedy_plan(lengths, max_seqs, max_tokens):
    """Cut at the budgets only (the adapter's former rule)."""
    plan, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or i - start + 1 > max_seqs or (i - start + 1) * lengths[start] > max_tokens:
            plan.append((start, i))
            start = i
    return plan


@pytest.mark.parametrize("seed", range(4))
def test_batch_plan_covers_in_order_within_budgets_and_beats_budget_cuts(seed):
    import numpy as np

    from evalsuite.measure.batch_plan import plan_batches

    rng = np.random.default_rng(seed)
    # long-tailed lengths, as task prompts are: most short, a few long
    lengths = np.sort(np.minimum(8 + rng.lognormal(3.5, 0.8, 3000).astype(np.int64), 1500))[::-1]
    keeps = rng.integers(1, 5, len(lengths))
    budgets = dict(max_seqs=512, max_tokens=40_000, max_scored=900)
    cost = dict(min_cost=2_000, attention_width=2_304)
    plan = plan_batches(lengths, keeps, **budgets, **cost)
    assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:])) and all(s < e for s, e in plan)
    for s, e in plan:
        assert e - s == 1 or (e - s <= budgets["max_seqs"] and (e - s) * lengths[s] <= budgets["max_tokens"]
                              and keeps[s:e].sum() <= budgets["max_scored"])
    greedy = _greedy_plan(lengths, budgets["max_seqs"], min(budgets["max_tokens"], 10**9))
    padded = sum((e - s) * lengths[s] for s, e in plan)
    assert _plan_cost(lengths, plan, **cost) <= _plan_cost(lengths, greedy, **cost)
    assert padded < 1.25 * lengths.sum()  # the tail is not padded to the longest input of its batch


def test_batch_plan_splits_where_lengths_drop_and_keeps_small_batches_whole():
    import numpy as np

    from evalsuite.measure.batch_plan import plan_batches

    lengths = np.asarray([1000] * 4 + [10] * 400)
    keeps = np.ones(len(lengths), dtype=np.int64)
    plan = plan_batches(lengths, keeps, 4096, 10**6, 10**6, min_cost=100, attention_width=4096)
    assert plan == [(0, 4), (4, 404)]
    # a forward's fixed cost above the padding saved: one batch
    assert plan_batches(lengths, keeps, 4096, 10**6, 10**6, min_cost=10**6) == [(0, 404)]
    # equal lengths beyond a budget are cut at the budget
    assert plan_batches(np.full(10, 7), np.ones(10, dtype=np.int64), 4, 10**6, 10**6) == [(0, 4), (4, 8), (8, 10)]
    assert plan_batches(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 4, 10, 10) == []


# ------------------------------------------------------------------ tokenizing
STRINGS = ["Question: Which gas do plants absorb?\nAnswer:", "Question: Which gas do plants absorb?\nAnswer: carbon dioxide",
           "  spaced  out  ", "naïve café — «ok»", "数字 123 and emoji 🙂", "\n\nnew\tlines", "a" * 300]


def test_direct_tokenizer_path_gives_the_tokenizers_ids(smollm2):
    tok = smollm2.tokenizer
    lm = TorchLM(smollm2.model, tok, device="cpu")
    for special in (False, True):
        assert lm.encode_many(STRINGS, add_special_tokens=special) == tok(STRINGS, add_special_tokens=special)["input_ids"]
    assert lm._direct_encoder() is tok._tokenizer  # the fast path is the one that ran


def test_backend_that_disagrees_is_not_used(smollm2):
    tok = smollm2.tokenizer

    class Shifted:  # a backend whose ids differ from the tokenizer's
        truncation = padding = None

        def encode_batch(self, strings, add_special_tokens=False):
            return [SimpleNamespace(ids=[i + 1 for i in ids]) for ids in tok(strings)["input_ids"]]

    class Wrapped:
        is_fast = True
        _tokenizer = Shifted()
        bos_token_id, eos_token_id = tok.bos_token_id, tok.eos_token_id

        def __call__(self, strings, add_special_tokens=False):
            return tok(strings, add_special_tokens=add_special_tokens)

    lm = TorchLM(smollm2.model, Wrapped(), device="cpu")
    assert lm.encode_many(STRINGS) == tok(STRINGS, add_special_tokens=False)["input_ids"]
    assert lm._direct_encoder() is None


def test_pretokenize_leaves_nothing_to_tokenize_when_answering(smollm2):
    lm = TorchLM(smollm2.model, smollm2.tokenizer, device="cpu", batch_size=3)
    insts = _instances("loglikelihood", REQUESTS) + _instances("loglikelihood_rolling", [("Some text to roll over.",)])
    lm.pretokenize(insts)
    calls = []
    original = lm._encode_batch
    lm._encode_batch = lambda strings, special: calls.append(strings) or original(strings, special)
    fresh = TorchLM(smollm2.model, smollm2.tokenizer, device="cpu", batch_size=3)
    ll = _instances("loglikelihood", REQUESTS)
    assert lm.loglikelihood(ll) == fresh.loglikelihood(ll)
    assert lm.loglikelihood_rolling(insts[-1:]) == fresh.loglikelihood_rolling(insts[-1:])
    assert calls == []  # every string was already in the cache


def test_plan_cache_batches_a_tasks_requests_once_across_variants(smollm2):
    """Variants of one task share the host's batching (tokens and plans do not depend on the model),
    never the answers: the second model's log-likelihoods are its own."""
    from evalsuite.quantize import parse_schemes, quantize_

    (cfg,) = parse_schemes("int8-wo")
    q8 = quantize_(copy.deepcopy(smollm2.model), cfg)
    insts = _instances("loglikelihood", REQUESTS)
    plans, made = {}, []

    def adapter(model, **kw):
        lm = TorchLM(model, smollm2.tokenizer, device="cpu", plan_cache=plans, **kw)
        original = lm._plan
        lm._plan = lambda reqs: made.append(1) or original(reqs)
        return lm

    fp = adapter(smollm2.model).loglikelihood(insts)
    q = adapter(q8).loglikelihood(insts)
    assert len(made) == 1  # planned once
    assert q == TorchLM(q8, smollm2.tokenizer, device="cpu").loglikelihood(insts) and q != fp
    adapter(q8, batch_size=1).loglikelihood(insts)  # other settings: planned again
    adapter(q8).loglikelihood(_instances("loglikelihood", REQUESTS))  # other instances: planned again
    assert len(made) == 3


@pytest.mark.parametrize("bos", [True, False], ids=["bos_tokenizer", "no_bos_tokenizer"])
def test_tokenization_follows_lm_eval_hflm(bos):
    """With a tokenizer that puts BOS first by default (Llama's, Gemma's) HFLM's contexts start with
    it; ours must too: the same per-request log-likelihoods, rolling log-likelihoods and greedy
    generations as HFLM's on the same model; and with one that adds nothing, nothing added."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tests.conftest import make_byte_tokenizer

    tok = make_byte_tokenizer(bos=bos)
    model = make_tiny_llama(vocab_size=260)
    pairs = [("Question: 2 + 2?\nAnswer:", " four"), ("The cat sat on the", " mat"), ("", "Empty context"),
             ("<s>Already has BOS,", " so none added"), ("trailing space ", "moves")]
    ll = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(["A whole text.", "x"])]
    gen = [Instance("generate_until", {}, ("Once upon a", {"until": ["\n"], "max_gen_toks": 4}), 0)]
    ours = TorchLM(model, tok, device="cpu")
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    got, ref = ours.loglikelihood(ll), hf.loglikelihood(ll)
    for (a, ga), (b, gb) in zip(got, ref):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4) and ga == gb
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), rel=1e-5, abs=1e-4)
    assert ours.generate_until(gen) == hf.generate_until(gen)
    assert ours.tok_encode("Hi") == hf.tok_encode("Hi") == ([256] if bos else []) + [72, 105]
