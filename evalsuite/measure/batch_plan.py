"""Batch planning for :class:`evalsuite.measure.lm_adapter.TorchLM`: how many tokens and scored rows
one forward may take (the memory budgets), where length-sorted inputs are cut into batches
(:func:`plan_batches`), and the host arrays of one padded or packed batch.

Nothing here runs a model: the adapter groups lm-eval's requests, asks this module for the batches,
and queues them on the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

ACTIVATION_BYTES = 2 << 30  # the largest activation of one forward (tokens x MLP width, bf16) on a GPU
SCORED_LOGITS_BYTES = 4 << 30  # the float32 logits of the scored positions of one forward
# the batch planner's cost model: any forward costs at least batch_tokens / MIN_COST_FRACTION tokens
# (the host's kernel launches of a small forward take that long), and a padded position of a row of
# width W costs 1 + W / (ATTENTION_WIDTH_PER_HIDDEN x hidden size) (causal attention grows with W)
MIN_COST_FRACTION = 8
ATTENTION_WIDTH_PER_HIDDEN = 4


@dataclass
class Scored:
    """One unique model input and the requests that read their log-likelihoods from it."""

    tokens: tuple[int, ...]
    keep: int  # how many final positions any of its requests scores
    members: list[tuple[int, list[int]]]  # (request index, target tokens)


@dataclass
class Batch:
    """One forward, prepared on the host: right-padded ids, the scored (row, position) pairs, and for
    each request answered (``owners``) the scored rows and targets of its tokens (``owner`` maps a
    token to its request's slot)."""

    owners: list[int]
    ids: np.ndarray
    rows: np.ndarray
    positions: np.ndarray
    flat_rows: np.ndarray
    flat_targets: np.ndarray
    owner: np.ndarray


@dataclass
class PackedBatch:
    """One packed forward (``evalsuite.measure.packed``), prepared on the host: the tokens back to back
    with their rotary positions, query/key segments, the scored token slots, and per answered request
    (``owners``) its rows among the scored ones and its targets, as in :class:`Batch`."""

    owners: list[int]
    ids: np.ndarray
    positions: np.ndarray
    key_index: np.ndarray | None
    cu_q: np.ndarray
    cu_k: np.ndarray
    max_q: int
    max_k: int
    scored: np.ndarray
    flat_rows: np.ndarray
    flat_targets: np.ndarray
    owner: np.ndarray


@dataclass
class Plan:
    """Every batch of one set of requests, and each request's key (for lm-eval's cache hook)."""

    keys: list[Any]
    batches: list[Batch] | list[PackedBatch]


def prepare_batch(batch: list[Scored]) -> Batch:
    """The host arrays of one batch of inputs (see :class:`Batch`)."""
    lengths = np.fromiter((len(g.tokens) for g in batch), dtype=np.int64, count=len(batch))
    keeps = np.fromiter((g.keep for g in batch), dtype=np.int64, count=len(batch))
    # right-padded ids: a row-major mask of real positions takes the concatenated tokens in order
    ids = np.zeros((len(batch), int(lengths.max())), dtype=np.int64)
    ids[np.arange(ids.shape[1]) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(g.tokens for g in batch), dtype=np.int64, count=int(lengths.sum()))
    # (row, position) of every scored position: the last ``keep`` positions of each input
    rows = np.repeat(np.arange(len(batch)), keeps)
    positions = np.repeat(lengths - keeps, keeps) + _ranges(keeps)
    # each request reads the last len(targets) of its input's scored rows
    owners: list[int] = []
    counts: list[int] = []
    firsts: list[int] = []
    start = 0
    for g in batch:
        for i, targets in g.members:
            owners.append(i)
            counts.append(len(targets))
            firsts.append(start + g.keep - len(targets))
        start += g.keep
    n = np.asarray(counts, dtype=np.int64)
    flat_rows = np.repeat(np.asarray(firsts, dtype=np.int64), n) + _ranges(n)
    flat_targets = np.fromiter(itertools.chain.from_iterable(t for g in batch for _, t in g.members),
                               dtype=np.int64, count=int(n.sum()))
    return Batch(owners=owners, ids=ids, rows=rows, positions=positions, flat_rows=flat_rows,
                  flat_targets=flat_targets, owner=np.repeat(np.arange(len(owners)), n))


def prepare_packed_batch(units: list[tuple[tuple[int, ...], list[tuple[tuple[int, ...], list]]]]) -> PackedBatch:
    """The host arrays of one packed batch (see :class:`PackedBatch`). Per unit (a prefix and its
    suffixes, longest first): one segment of the prefix and its first suffix, then one segment per
    further non-empty suffix whose keys are the prefix's slots and its own. A request with suffix S
    scores the prefix's last slot and S's slots.

    The loops below handle one number per segment or request; token-level arrays are built from
    them with numpy (``_ranges``)."""
    pieces: list[tuple[int, ...]] = []  # the token ids, in order
    seg_len, seg_pos = [], []  # per query segment: length, rotary position of its first token
    key_start, key_len = [], []  # key slots as ranges (a shared segment has two: the prefix's, its own)
    key_seg_len = []  # per key segment: its number of keys
    scored_start, scored_len = [], []  # scored slots as ranges
    owners, req_last, req_first, req_len = [], [], [], []  # per request
    targets: list[list[int]] = []
    slot = rows = 0  # tokens and scored rows so far
    shared = False
    for prefix, suffixes in units:
        p = len(prefix)
        start, last_row = slot, rows
        scored_start.append(start + p - 1)
        scored_len.append(1)
        rows += 1
        for k, (suffix, members) in enumerate(suffixes):
            m = len(suffix)
            if k == 0:
                pieces += (prefix, suffix)
                seg_len.append(p + m)
                seg_pos.append(0)
                key_start.append(start)
                key_len.append(p + m)
                key_seg_len.append(p + m)
                slot = start + p  # the suffix's first slot
            elif m:
                shared = True
                pieces.append(suffix)
                seg_len.append(m)
                seg_pos.append(p)
                key_start += (start, slot)
                key_len += (p, m)
                key_seg_len.append(p + m)
            scored_start.append(slot)
            scored_len.append(m)
            for i, tgt in members:
                owners.append(i)
                req_last.append(last_row)
                req_first.append(rows)
                req_len.append(m + 1)
                targets.append(tgt)
            rows += m
            slot += m
    seg = np.asarray(seg_len, dtype=np.int64)
    n_tokens = int(seg.sum())
    req_n = np.asarray(req_len, dtype=np.int64)
    # a request's rows: the prefix's last slot's row, then its suffix's rows
    flat_rows = np.repeat(np.asarray(req_first, dtype=np.int64) - 1, req_n) + _ranges(req_n)
    flat_rows[np.cumsum(req_n) - req_n] = req_last
    cu_q = np.concatenate([[0], np.cumsum(seg)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(key_seg_len)]).astype(np.int32)
    klen = np.asarray(key_len, dtype=np.int64)
    slen = np.asarray(scored_len, dtype=np.int64)
    return PackedBatch(
        owners=owners,
        ids=np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=n_tokens),
        positions=np.repeat(np.asarray(seg_pos, dtype=np.int64), seg) + _ranges(seg),
        key_index=np.repeat(np.asarray(key_start, dtype=np.int64), klen) + _ranges(klen) if shared else None,
        cu_q=cu_q, cu_k=cu_k, max_q=int(seg.max()), max_k=int(max(key_seg_len)),
        scored=np.repeat(np.asarray(scored_start, dtype=np.int64), slen) + _ranges(slen),
        flat_rows=flat_rows,
        flat_targets=np.fromiter(itertools.chain.from_iterable(targets), dtype=np.int64, count=int(req_n.sum())),
        owner=np.repeat(np.arange(len(owners)), req_n))


def gpu_batch_tokens(config: Any, free_bytes: int | None = None) -> int:
    """Padded tokens per forward on a GPU: the largest activation (tokens x MLP width, 2 bytes)
    near ``ACTIVATION_BYTES``, between 8,192 and 262,144 tokens, a multiple of 1,024; fewer (down to
    1,024) where ``free_bytes`` of device memory cannot hold one layer's 16-bit activations of them
    (:mod:`evalsuite.measure.memory`)."""
    from evalsuite.measure import memory

    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or 4096
    width = getattr(config, "intermediate_size", None) or 4 * int(hidden)
    tokens = int(min(262_144, max(8_192, ACTIVATION_BYTES // (2 * int(width)) // 1024 * 1024)))
    if free_bytes is None:
        return tokens
    kilo = memory.fit(1024 * memory.activation_bytes_per_token(config, 2), free_bytes, tokens // 1024)
    return kilo * 1024


def gpu_scored_rows(vocab: int, free_bytes: int | None = None) -> int:
    """float32 logits rows per forward: at most ``SCORED_LOGITS_BYTES`` of them (21k rows of SmolLM2's
    49k vocabulary), fewer where the free device memory cannot hold them; at least 1,024."""
    from evalsuite.measure import memory

    rows = max(1024, SCORED_LOGITS_BYTES // (4 * int(vocab)))
    return memory.fit(4 * int(vocab), free_bytes, rows, minimum=min(rows, 1024))


def plan_batches(lengths: np.ndarray, keeps: np.ndarray, max_seqs: int, max_tokens: int, max_scored: int,
                 min_cost: float = 0.0, attention_width: float = float("inf")) -> list[tuple[int, int]]:
    """Cut inputs sorted by length (longest first) into consecutive batches ``[start, end)`` that
    minimise the estimated device time, each within the budgets: at most ``max_seqs`` inputs,
    ``max_tokens`` padded tokens (inputs x the first one's length) and ``max_scored`` scored rows
    (sum of ``keeps``), always at least one input.

    A batch of n inputs padded to width W is estimated at ``max(min_cost, n W (1 + W /
    attention_width))`` token-times: padding costs what real tokens cost, attention adds a term
    growing with W, and a small forward still pays its launches. Cutting greedily at the budgets
    pads a whole batch to its longest input (twice the real tokens on ARC); this plan cuts where
    lengths drop instead, by dynamic programming over the points where the length changes and the
    budgets force a cut.
    """
    n = len(lengths)
    if n == 0:
        return []
    keep_cum = np.concatenate([[0], np.cumsum(keeps)])

    def furthest(s: int) -> int:
        """The largest end of a batch starting at s within the budgets (at least s + 1)."""
        cap = min(max_seqs, max_tokens // max(1, int(lengths[s])))
        by_rows = int(np.searchsorted(keep_cum, keep_cum[s] + max_scored, side="right")) - 1
        return max(s + 1, min(n, s + cap, by_rows))

    # candidate cuts: where the length changes, and each start's furthest end (so a run of equal
    # lengths longer than the budget is cut at the budget)
    cuts = {0, n, *(np.flatnonzero(lengths[1:] != lengths[:-1]) + 1).tolist()}
    todo = sorted(cuts)
    while todo:
        s = todo.pop()
        if s < n:
            e = furthest(s)
            if e not in cuts:
                cuts.add(e)
                todo.append(e)
    b = np.asarray(sorted(cuts), dtype=np.int64)
    best = np.full(len(b), np.inf)
    best[0] = 0.0
    prev = np.zeros(len(b), dtype=np.int64)
    for k in range(len(b) - 1):
        width = float(lengths[b[k]])
        hi = int(np.searchsorted(b, furthest(int(b[k])), side="right"))  # cuts b[k+1 : hi] are reachable
        count = (b[k + 1: hi] - b[k]).astype(np.float64)
        cost = best[k] + np.maximum(min_cost, count * width * (1.0 + width / attention_width))
        better = cost < best[k + 1: hi]
        best[k + 1: hi][better] = cost[better]
        prev[k + 1: hi][better] = k
    out = []
    k = len(b) - 1
    while k > 0:
        out.append((int(b[prev[k]]), int(b[k])))
        k = int(prev[k])
    return out[::-1]


def _ranges(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated: ``_ranges([2, 3]) = [0, 1, 0, 1, 2]``."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)
