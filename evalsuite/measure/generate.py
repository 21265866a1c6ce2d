"""Greedy decoding with a KV cache, batched over prompts: what ``generate_until`` and the gen stage run.

Prompts are sorted by length (longest first) and cut into batches under a row and a token budget
(prompt + new tokens per row). A batch is left-padded: the attention mask hides the pads and each
row's position ids count its own tokens only, so a row's tokens are those it gets alone. One prefill
fills a ``transformers.DynamicCache``; each step then feeds one token per live row. A row stops at
EOS, at its own ``max_new_tokens``, or when ``stop`` says so (lm-eval's ``until`` strings); finished
rows leave the batch and the cache at once, so the rest run on fewer rows.

A model without a Hugging Face cache interface (gpt-fast's ``Transformer``) is decoded by
:func:`greedy_decode_uncached`, which re-runs the whole prefix at every step: the reference the
cached path is tested against, token for token.

Only greedy decoding: the argmax of each step's logits (ties go to the lowest token id).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from evalsuite.load.model import forward_logits

# (row indices into the prompts, their generated tokens so far) -> which of them are done
StopCheck = Callable[[Sequence[int], Sequence[Sequence[int]]], Sequence[bool]]


def supports_kv_cache(model: nn.Module) -> bool:
    """A Hugging Face causal LM (its forward takes ``past_key_values``); gpt-fast models are not."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def cache_argument(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` from transformers 5.2x on, ``past_key_values``
    before (the old name is deprecated there)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generation_batches(lengths: Sequence[int], max_new_tokens: Sequence[int], max_rows: int,
                       max_tokens: int) -> list[list[int]]:
    """Prompt indices, longest first, cut into batches of at most ``max_rows`` rows and at most
    ``max_tokens`` cache slots (rows x (longest prompt + most new tokens)); at least one row each."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i] + max_new_tokens[i])
        if current and (len(current) >= max_rows or (len(current) + 1) * w > max_tokens):
            batches.append(current)
            current, w = [], lengths[i] + max_new_tokens[i]
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


def greedy_decode(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                  eos_token_id: int | None = None, stop: StopCheck | None = None, device: torch.device | str = "cpu",
                  max_rows: int = 64, max_tokens: int = 1 << 16, pad_token_id: int = 0,
                  use_cache: bool | None = None) -> list[list[int]]:
    """The greedy continuation (token ids, EOS included where it was produced) of each prompt, at most
    ``max_new_tokens[i]`` tokens. ``use_cache`` None: the KV cache where the model supports it."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be continued")
    if use_cache is None:
        use_cache = supports_kv_cache(model)
    device = torch.device(device)
    out: list[list[int]] = [[] for _ in prompts]
    for rows in generation_batches([len(p) for p in prompts], max_new_tokens, max_rows, max_tokens):
        decode = _decode_batch_cached if use_cache else _decode_batch_uncached
        for i, tokens in zip(rows, decode(model, [list(prompts[i]) for i in rows], [max_new_tokens[i] for i in rows],
                                          rows, eos_token_id, stop, device, pad_token_id)):
            out[i] = tokens
    return out


def greedy_decode_uncached(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                           eos_token_id: int | None = None, stop: StopCheck | None = None,
                           device: torch.device | str = "cpu", max_rows: int = 64, max_tokens: int = 1 << 16,
                           pad_token_id: int = 0) -> list[list[int]]:
    """:func:`greedy_decode` without a cache: every step re-runs each row's whole prefix."""
    return greedy_decode(model, prompts, max_new_tokens, eos_token_id, stop, device, max_rows, max_tokens,
                         pad_token_id, use_cache=False)


def _finished(rows: list[int], generated: list[list[int]], limits: list[int], live: list[int],
              eos_token_id: int | None, stop: StopCheck | None) -> list[bool]:
    done = [len(generated[k]) >= limits[k] or (eos_token_id is not None and generated[k][-1] == eos_token_id)
            for k in live]
    if stop is not None:
        ask = [j for j, d in enumerate(done) if not d]
        if ask:
            for j, d in zip(ask, stop([rows[live[j]] for j in ask], [generated[live[j]] for j in ask])):
                done[j] = bool(d)
    return done


@torch.inference_mode()
def _decode_batch_cached(model, prompts, limits, rows, eos_token_id, stop, device, pad_token_id):
    from transformers import DynamicCache

    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for k, p in enumerate(prompts):
        ids[k, width - len(p):] = torch.tensor(p)
        mask[k, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # each row's positions count its real tokens from 0 (pads get 0; they are masked out anyway)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    cached = {cache_argument(model): cache, "use_cache": True}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **cached).logits[:, -1]
    next_pos = positions[:, -1] + 1
    generated: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))  # batch slot -> row (index into prompts)
    while True:
        nxt = logits.argmax(-1)
        for k, t in zip(live, nxt.tolist()):
            generated[k].append(t)
        done = _finished(rows, generated, limits, live, eos_token_id, stop)
        if all(done):
            return generated
        if any(done):
            keep = torch.tensor([j for j, d in enumerate(done) if not d], device=device)
            live = [live[j] for j, d in enumerate(done) if not d]
            cache.batch_select_indices(keep)
            nxt, mask, next_pos = nxt[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       **cached).logits[:, -1]
        next_pos = next_pos + 1


@torch.inference_mode()
def _decode_batch_uncached(model, prompts, limits, rows, eos_token_id, stop, device, pad_token_id):
    seqs = [list(p) for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    while live:
        # right padding: causal attention keeps every real position blind to the pads after it
        lengths = [len(seqs[k]) for k in live]
        ids = torch.full((len(live), max(lengths)), pad_token_id, dtype=torch.long)
        for j, k in enumerate(live):
            ids[j, :lengths[j]] = torch.tensor(seqs[k])
        logits = forward_logits(model, ids.to(device))
        last = logits[torch.arange(len(live)), torch.tensor(lengths) - 1]
        for k, t in zip(live, last.argmax(-1).tolist()):
            seqs[k].append(t)
            generated[k].append(t)
        done = _finished(rows, generated, limits, live, eos_token_id, stop)
        live = [k for k, d in zip(live, done) if not d]
    return generated
