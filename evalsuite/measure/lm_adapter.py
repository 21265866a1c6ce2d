"""An lm-eval model over any causal-LM torch module, fp or quantized: ``TorchLM``.

lm-eval's ``HFLM`` runs a Hugging Face model one padded batch at a time with the full vocabulary
projection at every position; this adapter is the same computation, faster:

- requests are sorted by length (longest first) and cut into batches under a token budget where the
  estimated device time (padding included) is least (:func:`evalsuite.measure.batch_plan.plan_batches`);
- requests whose model input is identical (e.g. BoolQ's one-token " no"/" yes" after the same
  passage) share one forward;
- on a GPU, a Llama-architecture model runs packed batches instead (:mod:`evalsuite.measure.packed`):
  sequences back to back without padding, and a context shared by several continuations (ARC's four
  answers to one question) computed once, each continuation attending to it. This is used only after
  the packed logits matched the model's own forward on a probe input; ``packed=False`` turns it off;
- the vocabulary projection runs only on the hidden states of the positions that are scored
  (a pre-hook on the model's head), and the normaliser (logsumexp) runs in float32 on those rows only;
- tokens are lm-eval's: a context is encoded as HFLM's ``tok_encode`` does, BOS first where the
  tokenizer adds it by default (:mod:`evalsuite.measure.tokenization`, the rule of every stage);
- tokenization is batched and can be shared between the adapters of several variants (tokens do
  not depend on the model; lm-eval's request cache does not depend on it either, which is why we
  never use that cache).

Log-likelihood of a continuation (lm-eval's definition): the sum over its tokens of
log p(token | everything before it), in nats. The model input is context + continuation without its
last token (the last target token is never fed), truncated from the left to ``max_length`` tokens;
``is_greedy`` says whether every continuation token is the argmax at its position.
Right padding needs no attention mask: with causal attention no real position sees a pad.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterable

import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn

from evalsuite.errors import EvalsuiteError
from evalsuite.load.model import forward_logits
from evalsuite.measure.batch_plan import (ATTENTION_WIDTH_PER_HIDDEN, MIN_COST_FRACTION, Batch, PackedBatch, Plan,
                                          Scored, gpu_batch_tokens, gpu_scored_rows, plan_batches,
                                          prepare_batch, prepare_packed_batch)
from evalsuite.measure.tokenization import bos_rule

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256  # as HFLM
# rows decoded together on a GPU; free memory caps them too (the static KV cache's, or the token budget)
GENERATION_ROWS_GPU = 4096
BATCH_SIZE_GPU, BATCH_SIZE_CPU = 4096, 32  # sequences per forward when --task-batch-size is not given
# strings on which a fast tokenizer's backend must encode exactly as the tokenizer before it is used
PROBE_STRINGS = ("Question: What is 2 + 2?\nAnswer:", " Answer: four", "  two leading spaces", "trailing space ",
                 "ünïcödé — «quotes» and 日本語", "tab\tand\n\nnew lines", " ", "x")


# model -> ((adapter device, (weight device, dtype)), its PackedForward or None): the automatic choice
_AUTO_PACKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class TorchLM(TemplateLM):
    """lm-eval ``TemplateLM`` over ``model`` (any module ``forward_logits`` can call).

    ``batch_size`` caps sequences per forward (default 4096 on GPU, 32 on CPU; in packed batches,
    contexts per forward), ``batch_tokens`` caps padded tokens per forward (default on GPU: what
    keeps the largest activation, tokens x MLP width in bf16, near 2 GiB, between 8k and 256k tokens;
    4096 on CPU). ``packed``: None chooses packed batches where they apply (see the module doc), True
    asks for them, False turns them off. Few large forwards matter on a
    GPU: a small model's eager forward is ~1,400 kernel launches, so the host, not the device, sets
    the pace of many small ones. ``encode_cache`` (a dict) may be shared between adapters of the same
    tokenizer; ``plan_cache`` (a dict) between adapters of the same tokenizer and settings that answer
    the same lm-eval instances (the variants of one task): the host's work of turning requests into
    padded batches is then done once, not once per variant.
    """

    generation_path: str | None = None  # greedy_decode's path for generate_until (None: its default)

    def __init__(self, model: nn.Module, tokenizer: Any, device: torch.device | str | None = None,
                 batch_size: int | None = None, batch_tokens: int | None = None, max_length: int | None = None,
                 encode_cache: dict[str, list[int]] | None = None, plan_cache: dict | None = None,
                 show_progress: bool = False, packed: bool | None = None, memory_budget: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        on_gpu = self._device.type == "cuda"
        cfg = getattr(model, "config", None)
        self.batch_size = int(batch_size or (BATCH_SIZE_GPU if on_gpu else BATCH_SIZE_CPU))
        if self.batch_size < 1:
            raise EvalsuiteError("batch size must be at least 1")
        from evalsuite.measure.memory import free_bytes

        free = free_bytes(self._device) if on_gpu and memory_budget is None else memory_budget
        self.batch_tokens = int(batch_tokens or (gpu_batch_tokens(cfg, free) if on_gpu else 4096))
        vocab = getattr(cfg, "vocab_size", None) or 128_000
        self.scored_rows = gpu_scored_rows(int(vocab), free if on_gpu else None)
        cfg_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "block_size", None)
        # as HFLM: the model's context length, else 2048
        self.max_length = int(max_length or cfg_len or DEFAULT_MAX_LENGTH)
        self.forward_tokens = 0  # token positions run through the model so far
        self.encode_cache = encode_cache if encode_cache is not None else {}
        self.plan_cache = plan_cache
        self.show_progress = show_progress
        self._head = vocabulary_head(model)
        self._direct: Any = None  # the tokenizer's Rust backend once checked (False: not usable)
        self.rule = bos_rule(tokenizer)  # BOS first or not: HFLM's tok_encode, as every stage
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "dim", None) or 4096
        self.attention_width = ATTENTION_WIDTH_PER_HIDDEN * int(hidden)
        self.packed = packed
        self._packed: Any = None  # the PackedForward once decided (False: padded batches)

    # ----------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: BOS where the tokenizer has one (as HFLM)."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As HFLM's: None follows the tokenization rule (the tokenizer's default BOS), True/False as given."""
        if add_special_tokens is None:
            return self.rule.prefix(self.encode_many([string])[0], string)
        return self.encode_many([string], add_special_tokens=add_special_tokens)[0]

    def tok_decode(self, tokens: Iterable[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False)

    def encode_many(self, strings: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each string (one batched tokenizer call for those not yet cached)."""
        cache = self.encode_cache if not add_special_tokens else {}
        todo = list(dict.fromkeys(s for s in strings if s not in cache))
        if todo:
            cache.update(zip(todo, self._encode_batch(todo, add_special_tokens)))
        return [cache[s] for s in strings]

    def _encode_batch(self, strings: list[str], add_special_tokens: bool) -> list[list[int]]:
        """The tokenizer's ids for each string. A fast (Rust) tokenizer is called directly, which skips
        the Python conversion of every encoding (a fifth of BoolQ's tokenizing time) and gives the same
        ids, as checked on probe strings for each tokenizer before the direct path is trusted."""
        direct = self._direct_encoder()
        if direct is not None:
            return [e.ids for e in direct.encode_batch(strings, add_special_tokens=add_special_tokens)]
        return self.tokenizer(strings, add_special_tokens=add_special_tokens)["input_ids"]

    def _direct_encoder(self) -> Any:
        """The tokenizer's Rust backend, where it encodes exactly as the tokenizer does; else None."""
        if self._direct is None:
            backend = getattr(self.tokenizer, "_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
            ok = (backend is not None and hasattr(backend, "encode_batch")
                  and getattr(backend, "truncation", None) is None and getattr(backend, "padding", None) is None)
            if ok:
                try:
                    for special in (False, True):
                        got = [e.ids for e in backend.encode_batch(list(PROBE_STRINGS), add_special_tokens=special)]
                        ok = ok and got == self.tokenizer(list(PROBE_STRINGS), add_special_tokens=special)["input_ids"]
                except Exception:  # an unusual backend: use the tokenizer's own call
                    ok = False
            self._direct = backend if ok else False
        return self._direct or None

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """TemplateLM's encoding rules (trailing context spaces move to the continuation; the
        continuation's tokens are those of context+continuation after the context's), batched."""
        requests = list(requests)
        key = self._plan_key(requests) if self.plan_cache is not None else None
        cached = self.plan_cache.get(key) if key is not None else None
        if cached is not None and len(cached[0]) == len(requests) and all(a is b for a, b in zip(cached[0], requests)):
            plan = cached[1]
        else:
            plan = self._plan(self._token_requests(requests))
            if key is not None:
                self.plan_cache[key] = (requests, plan)
        return self._answer(plan, disable_tqdm)

    def _plan_key(self, requests: list) -> tuple:
        """The same instances (by identity; the cache keeps them alive) under the same settings."""
        return (tuple(map(id, requests)), self.batch_size, self.batch_tokens, self.scored_rows, self.max_length,
                self.attention_width, self.prefix_token_id, self.rule.bos_id, self._packed_forward() is not None)

    def _token_requests(self, requests: list) -> list[tuple[tuple, list[int], list[int]]]:
        pairs = _split_pairs(r.args for r in requests)
        self.encode_many(_pair_strings(pairs))
        new_reqs = []
        for (orig, (context, continuation)) in zip((r.args for r in requests), pairs):
            if context:  # HFLM's tok_encode puts the same BOS (or none) before both encodings
                raw_context = self.encode_cache[context]
                continuation_enc = self.encode_cache[context + continuation][len(raw_context):]
                context_enc = self.rule.prefix(raw_context, context)
            else:
                continuation_enc = self.encode_cache[continuation]
                if continuation_enc and continuation_enc[0] == self.prefix_token_id:
                    context_enc, continuation_enc = continuation_enc[:1], continuation_enc[1:]
                else:
                    context_enc = [self.prefix_token_id]
            new_reqs.append((tuple(orig), context_enc, continuation_enc))
        return new_reqs

    def pretokenize(self, instances: Iterable[Any]) -> None:
        """Tokenize into the shared cache every string that answering these lm-eval instances will
        need (the tasks stage does this for the next task while the device runs the current one)."""
        instances = list(instances)
        strings = _pair_strings(_split_pairs(i.args for i in instances if i.request_type == "loglikelihood"))
        strings += [i.args[0] for i in instances if i.request_type in ("loglikelihood_rolling", "generate_until")]
        self.encode_many(strings)

    # ----------------------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of continuation token log-probs in nats, is_greedy) per (key, context, continuation).

        Batches are queued on the device without waiting for their results, which are read back
        once at the end: the host prepares batch k+1 while the device runs batch k.
        """
        return self._answer(self._plan(requests), disable_tqdm)

    def _plan(self, requests) -> Plan:
        """Group requests by model input (context + continuation without its last token, truncated
        from the left to ``max_length``), sort the inputs by length and cut them into batches; or,
        where the model runs packed forwards, :meth:`_plan_packed`."""
        if self._packed_forward() is not None:
            return self._plan_packed(requests)
        groups: dict[tuple[int, ...], Scored] = {}
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            window, n = self._window(context_enc, continuation_enc)
            inp = tuple(window[:-1])
            g = groups.get(inp)
            if g is None:
                g = groups[inp] = Scored(inp, n, [])
            elif n > g.keep:
                g.keep = n
            g.members.append((i, window[-n:]))
        ordered = sorted(groups.values(), key=lambda g: -len(g.tokens))
        return Plan(keys=[r[0] for r in requests], batches=[prepare_batch(b) for b in self._batches(ordered)])

    def _window(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[list[int], int]:
        """Context + continuation truncated from the left to ``max_length`` + 1 tokens, and the
        continuation's length (checked: not empty, and shorter than the window)."""
        n = len(continuation_enc)
        if not n:
            raise EvalsuiteError("a request has an empty continuation; nothing to score")
        window = [*context_enc, *continuation_enc][-(self.max_length + 1):]
        if n >= len(window):
            raise EvalsuiteError(f"a continuation of {n} tokens does not fit max_length {self.max_length}")
        return window, n

    def _plan_packed(self, requests) -> Plan:
        """Group requests by prefix (the window before the continuation), and within a prefix by
        suffix (the continuation without its last token): each prefix is computed once, each distinct
        suffix once after it. Groups are packed back to back into batches under the token, scored-row
        and sequence budgets, in the order first met."""
        units: dict[tuple[int, ...], dict[tuple[int, ...], list[tuple[int, list[int]]]]] = {}
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            window, n = self._window(context_enc, continuation_enc)
            cut = len(window) - n
            units.setdefault(tuple(window[:cut]), {}).setdefault(tuple(window[cut:-1]), []).append((i, window[cut:]))
        batches, current, tokens, rows = [], [], 0, 0
        for prefix, suffixes in units.items():
            # the longest suffix shares the prefix's segment; an empty one (one-token continuations)
            # needs no segment: it reads the prefix's last slot
            unit = (prefix, sorted(suffixes.items(), key=lambda kv: -len(kv[0])))
            t = len(prefix) + sum(len(x) for x in suffixes)
            r = 1 + sum(len(x) for x in suffixes)
            if current and (tokens + t > self.batch_tokens or rows + r > self.scored_rows
                            or len(current) >= self.batch_size):
                batches.append(prepare_packed_batch(current))
                current, tokens, rows = [], 0, 0
            current.append(unit)
            tokens += t
            rows += r
        if current:
            batches.append(prepare_packed_batch(current))
        return Plan(keys=[r[0] for r in requests], batches=batches)

    def _packed_forward(self) -> Any:
        """The model's PackedForward when packed batches are used, else None. Automatic (``packed``
        None): on a GPU, for a Llama-architecture model whose packed logits match its own forward on a
        probe input (decided once per model, device and dtype: the tasks stage makes an adapter per
        task and variant); ``packed=True`` asks for it anywhere (a masked-attention reference off the
        GPU)."""
        if self._packed is None:
            from evalsuite.measure.packed import packed_forward

            chosen = None
            if self.packed:
                chosen = packed_forward(self.model)
                if chosen is None:
                    raise EvalsuiteError(f"packed forwards need a Llama-architecture model, not a "
                                         f"{type(self.model).__name__}")
            elif self.packed is None:
                weight = next(self.model.parameters(), None)
                setting = (self._device, None if weight is None else (weight.device, weight.dtype))
                known = _AUTO_PACKED.get(self.model)
                if known is not None and known[0] == setting:
                    chosen = known[1]
                else:
                    forward = packed_forward(self.model)
                    if forward is not None and forward.attention == "varlen" and self._probe_packed(forward):
                        chosen = forward
                    _AUTO_PACKED[self.model] = (setting, chosen)
            self._packed = chosen if chosen is not None else False
        return self._packed or None

    def _probe_packed(self, forward: Any) -> bool:
        """Do packed logits equal the model's own forward on a small input (a prefix, two suffixes)?
        Relative L2 error within 2% in 16-bit, 1e-4 in float32; else the padded path is used."""
        vocab = int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 100)
        g = torch.Generator().manual_seed(0)
        prefix, s1, s2 = (torch.randint(0, vocab, (n,), generator=g).tolist() for n in (9, 3, 2))
        reqs = [(("probe", "1"), prefix, s1 + [1]), (("probe", "2"), prefix, s2 + [1])]
        (batch,) = self._plan_packed(reqs).batches
        with torch.inference_mode():
            got = self._packed_logits(batch, forward).float()
            ids = torch.tensor([prefix + s1, prefix + s2 + [0]], device=self._device)
            full = forward_logits(self.model, ids)
        # each request scores its prefix's last position and its suffix's: from position 8 on
        rows = {0: full[0, 8:12], 1: full[1, 8:11]}
        want = torch.cat([rows[i] for i in batch.owners]).float()
        got = got[torch.as_tensor(batch.flat_rows, device=got.device)]
        tolerance = 1e-4 if full.dtype == torch.float32 else 2e-2
        return bool(((got - want).norm() / want.norm()).item() <= tolerance)

    def _answer(self, plan: Plan, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        owners: list[int] = []
        sums, misses = [], []
        for batch in _progress(plan.batches, "loglikelihood", disable_tqdm or not self.show_progress):
            batch_sums, batch_misses = self._score_batch(batch)
            self.forward_tokens += int(batch.ids.size)  # positions computed, padding included (for MFU)
            owners += batch.owners
            sums.append(batch_sums)
            misses.append(batch_misses)
        out: list[tuple[float, bool] | None] = [None] * len(plan.keys)
        if owners:
            for i, total, missed in zip(owners, torch.cat(sums).tolist(), torch.cat(misses).tolist()):
                out[i] = (total, missed == 0)
                self.cache_hook.add_partial("loglikelihood", plan.keys[i], out[i])
        return out  # type: ignore[return-value]

    def _batches(self, ordered: list[Scored]) -> Iterable[list[Scored]]:
        """Consecutive runs of the length-sorted inputs, cut by :func:`plan_batches` under the
        sequence, padded-token and scored-row budgets."""
        lengths = np.fromiter((len(g.tokens) for g in ordered), dtype=np.int64, count=len(ordered))
        keeps = np.fromiter((g.keep for g in ordered), dtype=np.int64, count=len(ordered))
        for start, end in plan_batches(lengths, keeps, self.batch_size, self.batch_tokens, self.scored_rows,
                                       min_cost=self.batch_tokens // MIN_COST_FRACTION,
                                       attention_width=self.attention_width):
            yield ordered[start:end]

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        if self._device.type == "cuda":  # pinned, so the copy queues behind the running batch
            return t.pin_memory().to(self._device, non_blocking=True)
        return t.to(self._device)

    def _score_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue one batch: (on the device, not yet read) each answered request's float64
        log-likelihood and count of non-greedy tokens, in ``batch.owners`` order."""
        dev = self._to_device
        if isinstance(batch, PackedBatch):
            selected = self._packed_logits(batch, self._packed).float()
        else:
            selected = self._logits_at(dev(batch.ids), dev(batch.rows), dev(batch.positions)).float()
        # log p(target) = logit(target) - logsumexp(logits): no [N, vocab] log-softmax is written
        log_z = torch.logsumexp(selected, dim=-1)
        greedy = selected.argmax(dim=-1)
        fr, ft, own = dev(batch.flat_rows), dev(batch.flat_targets), dev(batch.owner)
        token_lp = (selected[fr, ft] - log_z[fr]).double()
        token_miss = (greedy[fr] != ft).to(torch.int32)
        n = len(batch.owners)
        sums = torch.zeros(n, dtype=torch.float64, device=self._device).index_add_(0, own, token_lp)
        misses = torch.zeros(n, dtype=torch.int32, device=self._device).index_add_(0, own, token_miss)
        return sums, misses

    def _packed_logits(self, batch: PackedBatch, forward: Any) -> torch.Tensor:
        dev = self._to_device
        return forward.logits(dev(batch.ids), dev(batch.positions),
                              None if batch.key_index is None else dev(batch.key_index), dev(batch.cu_q),
                              dev(batch.cu_k), batch.max_q, batch.max_k, dev(batch.scored))

    def _logits_at(self, ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] at the given (row, position) pairs (index tensors on the device) of a
        forward over ``ids``.

        Where the model's vocabulary projection is a known module, a pre-hook hands it only those
        N hidden states, so the projection (the costliest matmul of a small model) and anything the
        model applies to its logits afterwards (scaling, soft-capping) run on N rows, not all.
        """
        with _shape_free_attention(ids):
            if self._head is None:
                return forward_logits(self.model, ids)[rows, positions]

            def pick(module, args):
                hidden = args[0]
                return (hidden[rows, positions].unsqueeze(0), *args[1:])

            handle = self._head.register_forward_pre_hook(pick)
            try:
                logits = forward_logits(self.model, ids)
            finally:
                handle.remove()
        return logits.reshape(len(rows), -1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings in disjoint windows of ``max_length`` tokens (the first
        token conditioned on the prefix token), summed per string; lm-eval's definition."""
        texts = [r.args[0] for r in requests]
        windows, owner = [], []
        for k, tokens in enumerate(map(self.rule.prefix, self.encode_many(texts), texts)):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), list(ctx), list(cont)))
                owner.append(k)
        totals = [0.0] * len(texts)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string (``until``), EOS or ``max_gen_toks``
        tokens (default 256), as lm-eval's HFLM: the context is truncated from the left to
        ``max_length - max_gen_toks`` tokens and the text is cut before the first stop string.

        Decoded by :func:`evalsuite.measure.generate.greedy_decode` (KV cache, batched, each row
        stopping when done). Greedy only: sampling arguments (``do_sample``, a temperature above 0,
        ``top_p``, ``top_k``) are ignored and named in ``generation_notes`` for the record.
        """
        from evalsuite.measure.generate import greedy_decode

        requests = list(requests)
        if not requests:
            return []
        texts = [r.args[0] for r in requests]
        contexts = list(map(self.rule.prefix, self.encode_many(texts), texts))
        eos_text = self.tok_decode([self.eot_token_id])
        stops, limits, prompts = [], [], []
        for context, r in zip(contexts, requests):
            kw = dict(r.args[1] or {})
            self._note_sampling(kw)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            stops.append([s for s in until + [eos_text] if s])
            limit = int(kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            limits.append(limit)
            room = self.max_length - limit
            if room < 1:
                raise EvalsuiteError(f"max_gen_toks {limit} leaves no room for a context in max_length {self.max_length}")
            prompts.append(context[-room:] if context else [self.prefix_token_id])
        check = _StopStrings(self, stops)
        rows = min(self.batch_size, GENERATION_ROWS_GPU if self._device.type == "cuda" else self.batch_size)
        # which decoding path ran (and why a static one fell back), for the benchmark and the curious
        self.generation_info: dict = {}
        tokens = greedy_decode(self.model, prompts, limits, eos_token_id=self.eot_token_id, stop=check,
                               device=self._device, max_rows=rows, max_tokens=self.batch_tokens,
                               pad_token_id=self.eot_token_id, path=self.generation_path, info=self.generation_info)
        outputs = []
        for r, toks, until in zip(requests, tokens, stops):
            text = self.tok_decode(toks)
            for s in until:
                text = text.split(s)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", r.args, text)
        return outputs

    def _note_sampling(self, kw: dict) -> None:
        notes = getattr(self, "generation_notes", None)
        if notes is None:
            notes = self.generation_notes = set()
        if kw.get("do_sample"):
            notes.add("do_sample")
        if float(kw.get("temperature", 0.0) or 0.0) > 0:
            notes.add("temperature")
        for name in ("top_p", "top_k", "num_beams"):
            if kw.get(name) not in (None, 1, 1.0) and not (name == "top_p" and kw.get(name) == 1.0):
                notes.add(name)


class _StopStrings:
    """Which rows' generations contain one of their stop strings: only the text of the last tokens is
    decoded (a stop string of c characters lies within the last c + 8 tokens, the 8 for tokens that
    decode to partial characters). A stop missed here only costs steps: the text is cut at the first
    stop string after decoding."""

    def __init__(self, lm: "TorchLM", stops: list[list[str]]) -> None:
        self.lm = lm
        self.stops = stops
        self.lookback = [max((len(s) for s in st), default=0) + 8 for st in stops]

    def __call__(self, rows, generated) -> list[bool]:
        tails = [list(g[-self.lookback[i]:]) for i, g in zip(rows, generated)]
        direct = self.lm._direct_encoder()
        texts = (direct.decode_batch(tails, skip_special_tokens=False) if direct is not None
                 else [self.lm.tok_decode(t) for t in tails])
        return [any(s in text for s in self.stops[i]) for i, text in zip(rows, texts)]


def _split_pairs(args: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(context, continuation) pairs with the context's trailing whitespace moved to the
    continuation, as lm-eval's TemplateLM does before encoding."""
    pairs = []
    for context, continuation in args:
        if context:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
        pairs.append((context, continuation))
    return pairs


def _pair_strings(pairs: list[tuple[str, str]]) -> list[str]:
    """The strings whose tokens a loglikelihood request needs: context and context + continuation
    (the continuation alone for an empty context)."""
    return [s for c, x in pairs for s in ((c, c + x) if c else (x,))]


def _shape_free_attention(ids: torch.Tensor):
    """On a GPU, attention without cuDNN's kernels: cuDNN builds an execution plan for every new
    (batch, length) shape, ~2 s of set-up over one ARC-Easy pass, where every batch has a new shape;
    flash attention needs none. Elsewhere, nothing changes."""
    if ids.device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def vocabulary_head(model: nn.Module) -> nn.Module | None:
    """The module projecting the last hidden states onto the vocabulary, if we can name it:
    a Hugging Face model's output embeddings, a gpt-fast Transformer's ``output``."""
    from evalsuite.load import gptfast

    if isinstance(model, gptfast.Transformer):
        return model.output
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _progress(items: list, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=disable, leave=False, mininterval=1.0)
