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

On a GPU a Llama-style model decodes through a static KV cache instead
(:class:`evalsuite.load.static_cache.StaticCacheDecoder`, ``path="static"``): batches as many rows as
free memory allows for the cache, keeps finished rows in the batch (their extra tokens are cut), so
every step has the same shapes and ``STOP_CHECK_STEPS`` steps are replayed as one CUDA graph; the host
then checks those steps' tokens (EOS, limits and ``stop`` at every step, so a row ends exactly where
it would end step by step) while the GPU already decodes the next ones. Before it is used, its
prefill logits are checked against the model's own forward on a probe; a model it cannot express
runs the DynamicCache path. ``stop`` must be a pure function of a row and its tokens.

Only greedy decoding: the argmax of each step's logits (ties go to the lowest token id).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from evalsuite.errors import EvalsuiteError, first_line
from evalsuite.load.model import forward_logits

# (row indices into the prompts, their generated tokens so far) -> which of them are done
StopCheck = Callable[[Sequence[int], Sequence[Sequence[int]]], Sequence[bool]]

PATHS = ("static", "dynamic", "uncached")
STOP_CHECK_STEPS = 8  # static path: decoding steps per CUDA graph replay and per host check
CACHE_MEMORY_FRACTION = 0.5  # of the free device memory, for the static KV cache (rest: prefill, graphs)
PREFILL_TOKENS = {"cuda": 1 << 15, "cpu": 1 << 12}  # padded prompt tokens per prefill forward
# the static decoder's last-position logits vs the model's own forward on a probe, |diff| / |ref| (L2):
# the packed-batch probe's tolerances (lm_adapter), i.e. the dtype's rounding, not a model's mistake
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
PROBE_TOLERANCE_16BIT = 2e-2


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
                  use_cache: bool | None = None, path: str | None = None, stop_every: int = STOP_CHECK_STEPS,
                  info: dict | None = None) -> list[list[int]]:
    """The greedy continuation (token ids, EOS included where it was produced) of each prompt, at most
    ``max_new_tokens[i]`` tokens.

    ``path``: "static" (static KV cache, the default on CUDA where the model allows it), "dynamic"
    (``DynamicCache``, the default elsewhere), "uncached" (the reference); ``use_cache=False`` is
    "uncached". On CUDA the static path sizes its batches from free memory (``max_tokens`` is then
    not used). ``info``, if given, receives the path taken and why a static one fell back.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be continued")
    device = torch.device(device)
    if path is None:
        if use_cache is False or not supports_kv_cache(model):
            path = "uncached"
        else:
            path = "static" if device.type == "cuda" else "dynamic"
    elif path not in PATHS:
        raise ValueError(f"unknown decoding path {path!r}; one of {', '.join(PATHS)}")
    info = {} if info is None else info
    decoder = None
    if path == "static":
        decoder, reason = _static_decoder(model, prompts, device)
        if decoder is None:
            info["static_fallback"] = reason
            path = "dynamic" if supports_kv_cache(model) else "uncached"
    info["path"] = path
    lengths = [len(p) for p in prompts]
    caller_max_tokens = max_tokens
    if decoder is not None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's spare
            max_tokens = int(free * CACHE_MEMORY_FRACTION) // decoder.slot_bytes()
        batches = generation_batches(lengths, [m + stop_every for m in max_new_tokens], max_rows, max_tokens)
    else:
        batches = generation_batches(lengths, max_new_tokens, max_rows, max_tokens)
    info["batches"] = len(batches)
    out: list[list[int]] = [[] for _ in prompts]
    for b, rows in enumerate(batches):
        args = ([list(prompts[i]) for i in rows], [max_new_tokens[i] for i in rows], rows, eos_token_id, stop,
                device, pad_token_id)
        if decoder is None:
            tokens = (_decode_batch_cached if path == "dynamic" else _decode_batch_uncached)(model, *args)
        else:
            try:
                tokens = _decode_batch_static(decoder, *args, stop_every=stop_every, info=info)
            except torch.cuda.OutOfMemoryError as e:  # sized from free memory, but others share the device
                decoder.release()
                torch.cuda.empty_cache()
                info["static_fallback"] = f"out of memory in a batch of {len(rows)} rows: {first_line(e)}"
                rest = [i for r in batches[b:] for i in r]
                again = greedy_decode(model, [prompts[i] for i in rest], [max_new_tokens[i] for i in rest],
                                      eos_token_id, _renumbered(stop, rest), device, max_rows, caller_max_tokens,
                                      pad_token_id, path="dynamic")
                info["path"] = "dynamic"
                for i, t in zip(rest, again):
                    out[i] = t
                return out
        for i, t in zip(rows, tokens):
            out[i] = t
    if decoder is not None:
        decoder.release()
    return out


def _renumbered(stop: StopCheck | None, index: list[int]) -> StopCheck | None:
    """``stop`` for a subset of the prompts: row k of the subset is prompt ``index[k]``."""
    if stop is None:
        return None
    return lambda rows, generated: stop([index[k] for k in rows], generated)


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


def _static_decoder(model: nn.Module, prompts: Sequence[Sequence[int]], device: torch.device):
    """(StaticCacheDecoder, None) if the model can decode through it and its logits match the model's
    own forward on a probe (a prompt's first tokens, left-padded), else (None, why not)."""
    from evalsuite.load.static_cache import StaticCacheDecoder

    if not supports_kv_cache(model):
        return None, f"{type(model).__name__} is not a Hugging Face causal LM"
    try:
        decoder = StaticCacheDecoder(model)
        return _probed(decoder, model, prompts, device)
    except EvalsuiteError as e:
        return None, str(e)
    except Exception as e:  # a model the mapping or the probe trips over: decoded the ordinary way
        return None, f"static-cache decoder failed on a probe: {type(e).__name__}: {first_line(e)}"


def _probed(decoder, model: nn.Module, prompts: Sequence[Sequence[int]], device: torch.device):
    probe = list(prompts[0][:12])
    pad = 3  # exercises the per-row start (and a row without pads beside it)
    with torch.inference_mode(False), torch.no_grad():
        decoder.allocate(2, pad + len(probe))
        ids = torch.tensor([[0] * pad + probe, probe + probe[-1:] * pad], device=device)
        start = torch.tensor([pad, 0], device=device)
        got = decoder(ids, torch.arange(ids.shape[1], device=device), start).float()
        decoder.release()
        ref = torch.stack([forward_logits(model, torch.tensor([probe], device=device))[0, -1],
                           forward_logits(model, ids[1:])[0, -1]]).float()
    error = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    tolerance = PROBE_TOLERANCE.get(decoder.dtype, PROBE_TOLERANCE_16BIT)
    if not error <= tolerance:
        return None, f"static-cache logits differ from the model's forward by {error:.3g} (> {tolerance:g}) on a probe"
    return decoder, None


def _absorb(chunk: list[list[int]], live: list[int], generated: list[list[int]], limits: list[int],
            rows: list[int], eos_token_id: int | None, stop: StopCheck | None) -> list[int]:
    """Append each live row's new tokens ``chunk[k]`` up to where the step-by-step rule would have
    stopped it (limit, EOS, or ``stop`` after any step); returns the rows still live."""
    ends: dict[int, int] = {}  # row -> its final length, where a limit or EOS ends it in this chunk
    asks: list[tuple[int, int]] = []  # (row, length) whose stop check the step-by-step rule would make
    for k in live:
        before = len(generated[k])
        generated[k].extend(chunk[k])
        for n in range(before + 1, len(generated[k]) + 1):
            if n >= limits[k] or (eos_token_id is not None and generated[k][n - 1] == eos_token_id):
                ends[k] = n
                break
            if stop is not None:
                asks.append((k, n))
    if asks:
        verdicts = stop([rows[k] for k, _ in asks], [generated[k][:n] for k, n in asks])
        for (k, n), d in zip(asks, verdicts):
            if d and n < ends.get(k, n + 1):
                ends[k] = n
    for k, n in ends.items():
        del generated[k][n:]
    return [k for k in live if k not in ends]


def _decode_batch_static(decoder, prompts, limits, rows, eos_token_id, stop, device, pad_token_id, stop_every, info):
    # no_grad rather than inference mode: the cache and graph buffers are updated in place by replays
    with torch.inference_mode(False), torch.no_grad():
        return _static_loop(decoder, prompts, limits, rows, eos_token_id, stop, device, pad_token_id,
                            max(1, int(stop_every)), info)


def _static_loop(decoder, prompts, limits, rows, eos_token_id, stop, device, pad_token_id, every, info):
    n = len(prompts)
    width = max(len(p) for p in prompts)
    decoder.allocate(n, width + max(limits) + every)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    for k, p in enumerate(prompts):
        ids[k, width - len(p):] = torch.tensor(p)
    ids = ids.to(device)
    start = torch.tensor([width - len(p) for p in prompts], device=device)
    token = torch.empty(n, dtype=torch.long, device=device)
    per_prefill = max(1, PREFILL_TOKENS.get(device.type, PREFILL_TOKENS["cpu"]) // width)
    for r0 in range(0, n, per_prefill):
        r1 = min(n, r0 + per_prefill)
        w = max(len(p) for p in prompts[r0:r1])  # slots before width - w are pads in every row here
        logits = decoder(ids[r0:r1, width - w:], torch.arange(width - w, width, device=device), start[r0:r1],
                         row0=r0, n_keys=width)
        token[r0:r1] = logits.argmax(-1)
    slot = torch.tensor([width], device=device)
    steps = torch.empty((n, every), dtype=torch.long, device=device)

    def decode_steps():
        t = token
        for j in range(every):
            t = decoder(t[:, None], slot, start).argmax(-1)
            steps[:, j] = t
            slot.add_(1)
        token.copy_(t)

    generated: list[list[int]] = [[] for _ in range(n)]
    live = _absorb([[t] for t in token.tolist()], list(range(n)), generated, limits, rows, eos_token_id, stop)
    run = decode_steps
    if live and device.type == "cuda":
        run = _captured(decoder, decode_steps, token, slot, start, info)

    def launch():
        run()
        if device.type != "cuda":
            return steps.clone(), None
        host = torch.empty(steps.shape, dtype=steps.dtype, pin_memory=True)  # pinned: the copy is asynchronous
        host.copy_(steps, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    produced = 1
    pending = launch() if live and produced < max(limits[k] for k in live) else None
    while pending is not None:
        host, event = pending
        produced += every
        # the GPU decodes the next steps while the host checks these (at worst ``every`` steps wasted)
        pending = launch() if produced < max(limits[k] for k in live) else None
        if event is not None:
            event.synchronize()
        live = _absorb(host.tolist(), live, generated, limits, rows, eos_token_id, stop)
        if not live:
            break
        if pending is None and produced < max(limits[k] for k in live):
            pending = launch()
    if pending is not None and pending[1] is not None:
        pending[1].synchronize()  # a launched replay still writes into the buffers released below
    return generated


def _captured(decoder, decode_steps, token, slot, start, info):
    """``decode_steps`` captured as one CUDA graph (replayed as it is); ``decode_steps`` itself where
    capture fails (noted in ``info``)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            # warm-up (lazy kernel compiles, cuBLAS workspaces): writes the slot the first step
            # rewrites with the same values, and moves nothing on
            decoder(token[:, None], slot, start)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_steps()
    except Exception as e:  # an op that cannot be captured: run the same steps eagerly
        torch.cuda.synchronize()
        info["cuda_graph_error"] = f"{type(e).__name__}: {first_line(e)}"
        warnings.warn(f"static decoding runs without a CUDA graph: {info['cuda_graph_error']}")
        return decode_steps
    info["cuda_graph"] = True
    return graph.replay
