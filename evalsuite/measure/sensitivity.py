"""Counterfactual layer sensitivity: how much of a variant's damage each quantized layer causes.

For a quantized variant Q of fp model P, on calibration windows (never the evaluation windows: see
:func:`calibration_corpus`), ``measure(S)`` is the mean per-token KL(P || Q_S) and the mean NLL
difference, where Q_S is Q with the layers of S restored to their fp modules. The fp logits are
computed once and kept; each counterfactual swaps modules in place (the fp ``nn.Linear`` objects
themselves, nothing copied) between forwards and swaps them back, so one counterfactual costs one
forward over the calibration tokens and the model is loaded once.

Definitions (per scored calibration token, natural logs):
- ``kld_mean`` = mean KL(P || Q_S) in nats; ``ln_ppl_ratio`` = mean NLL(Q_S) - mean NLL(P) (nats/token),
  ``ppl_ratio`` = exp(ln_ppl_ratio);
- sensitivity of a layer (``kld_drop``): the KLD restoring it to fp would remove, estimated by the
  layer's diagonal Fisher score in its first format (:func:`fisher_estimates`, :func:`fisher_prior`);
- the per-layer format searches of ``evalsuite fix``: each layer may move to any of its larger
  formats (:func:`layer_formats`), chosen greedily by KLD reduction per extra byte. The default,
  :func:`path_search`, orders every move once by estimates (:func:`fisher_estimates`: the diagonal
  Fisher score of each layer in each format, from one forward and backward of fp) into a path
  (:func:`estimated_path`) and bisects its length by measurement, so each recipe it keeps is
  measured, at about log2(moves) forwards. :func:`greedy_formats` re-measures each move on top of
  the current assignment before taking it (interactions measured, not assumed additive; lazy
  greedy: a move's ratio rarely grows as the recipe grows), hundreds of forwards. The result is a
  recipe (:func:`to_recipe`), its size effective bits per weight (:func:`bits_per_weight`), and
  :func:`simple_strategies` gives the frontier's comparison points.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from evalsuite.errors import EvalsuiteError
from evalsuite.load.model import forward_logits

# the ppl corpus → a disjoint calibration corpus (WikiText-2 test ↔ validation)
CALIBRATION_FOR = {"wikitext2": "wikitext2-valid", "wikitext2-valid": "wikitext2"}
_BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks)\.\d+)\.")


def calibration_corpus(ppl_corpus: str, fix_corpus: str | None) -> str:
    """The calibration corpus spec: ``fix_corpus`` if given (it must differ from the evaluation
    corpus), else the other WikiText-2 split; a file corpus needs an explicit ``--fix-corpus``."""
    if fix_corpus:
        if fix_corpus == ppl_corpus or (Path(fix_corpus).exists() and Path(ppl_corpus).exists()
                                        and Path(fix_corpus).resolve() == Path(ppl_corpus).resolve()):
            raise EvalsuiteError(f"--fix-corpus {fix_corpus} is the evaluation corpus itself: the fix would be fitted "
                                 "to the test; give a disjoint corpus")
        return fix_corpus
    if ppl_corpus in CALIBRATION_FOR:
        return CALIBRATION_FOR[ppl_corpus]
    raise EvalsuiteError(f"--ppl-corpus {ppl_corpus} is a file: give --fix-corpus, a disjoint calibration text")


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the runtime quantized linears of ``model`` (modules with ``dequantize``)."""
    return [n for n, m in model.named_modules() if hasattr(m, "dequantize") and hasattr(m, "in_features")]


def block_of(name: str) -> str | None:
    m = _BLOCK.match(name)
    return m.group(1) if m else None


@contextlib.contextmanager
def swapped(quantized: nn.Module, modules: dict[str, nn.Module]):
    """``quantized`` with each named layer replaced by the given module for the duration of the block."""
    saved = []
    try:
        for name, module in modules.items():
            parent_name, _, child = name.rpartition(".")
            parent = quantized.get_submodule(parent_name) if parent_name else quantized
            saved.append((parent, child, getattr(parent, child)))
            setattr(parent, child, module)
        yield quantized
    finally:
        for parent, child, mod in reversed(saved):
            setattr(parent, child, mod)


def restored(quantized: nn.Module, fp: nn.Module, layers: Iterable[str]):
    """``quantized`` with ``layers`` swapped for fp's own modules for the duration of the block."""
    return swapped(quantized, {name: fp.get_submodule(name) for name in layers})


@dataclass
class Metrics:
    kld_mean: float
    ln_ppl_ratio: float
    tokens: int

    @property
    def ppl_ratio(self) -> float:
        return math.exp(self.ln_ppl_ratio)

    def to_dict(self) -> dict[str, float]:
        return {"kld_mean": self.kld_mean, "ppl_ratio": self.ppl_ratio, "ln_ppl_ratio": self.ln_ppl_ratio,
                "tokens": self.tokens}


class Counterfactuals:
    """Mean KLD and NLL gap of ``quantized`` with any set of layers restored, on ``input_ids``
    ([windows, context], every position after the first scored); fp logits cached once."""

    def __init__(self, fp: nn.Module, quantized: nn.Module, input_ids: torch.Tensor, device: torch.device,
                 stats_fn: Callable, batch_size: int = 1):
        self.fp, self.quantized, self.device, self.stats_fn = fp, quantized, device, stats_fn
        self.batches = [input_ids[i: i + batch_size].to(device) for i in range(0, len(input_ids), batch_size)]
        self.fp_logits = [forward_logits(fp, x)[:, :-1] for x in self.batches]
        self.forwards = 0

    @torch.inference_mode()
    def measure_modules(self, modules: dict[str, nn.Module]) -> Metrics:
        """The metrics of ``quantized`` with these layers replaced by these modules (another format)."""
        kld = nll_gap = 0.0
        n = 0
        with swapped(self.quantized, modules):
            for x, ref in zip(self.batches, self.fp_logits):
                q = forward_logits(self.quantized, x)[:, :-1]
                for b in range(x.shape[0]):
                    s = self.stats_fn(ref[b], q[b], x[b, 1:])
                    ok = torch.isfinite(s["kld"])
                    kld += float(s["kld"][ok].double().sum())
                    nll_gap += float((s["nll"][ok].double() - s["nll_ref"][ok].double()).sum())
                    n += int(ok.sum())
                del q
        self.forwards += 1
        if n == 0:
            return Metrics(math.inf, math.inf, 0)
        return Metrics(kld / n, nll_gap / n, n)


def calibration_windows(tokenizer, text: str, tokens: int, context: int, source: str):
    """Disjoint windows of ``context`` tokens (fewer where ``tokens`` is smaller) from the start of
    ``text``, holding at least ``tokens`` tokens in all (a whole number of windows)."""
    from evalsuite.measure.perplexity import Protocol, make_windows, tokenize_corpus, tokenizer_bos

    context = min(context, tokens)
    n_windows = max(1, -(-tokens // context))
    need = n_windows * context
    # a prefix of the text is enough (~4 characters a token in English; 16 leaves room), cut at a line
    # end so no word is split; the whole text where the prefix falls short
    cut = text.find("\n", need * 16)
    if cut > 0:
        ids, ends = tokenize_corpus(tokenizer, text[:cut])
        if len(ids) >= need:
            text = text[:cut]
        else:
            cut = -1
    if cut <= 0:
        ids, ends = tokenize_corpus(tokenizer, text)
    return make_windows(ids, text, ends, Protocol(context=context, max_windows=n_windows), tokenizer_bos(tokenizer),
                        source, decode=tokenizer.decode)



# --- per-layer formats: which scheme each layer takes --------------------------------------------

FLOAT = "fp"


def candidate_schemes(scheme: str) -> list[str]:
    """A layer's formats, fewest bytes first: the failing scheme, a finer group for int4, int8-wo, fp."""
    out = [scheme]
    if scheme.startswith("int4-wo-g") and scheme != "int4-wo-g32":
        out.append("int4-wo-g32")
    if scheme != "int8-wo":
        out.append("int8-wo")
    return [*out, FLOAT]


@dataclass(frozen=True)
class Format:
    """One layer in one scheme: its runtime module, its weight bytes as stored (no bias) and its
    number of weights (for effective bits per weight: 8 x bytes / weights)."""

    scheme: str
    module: nn.Module
    bytes: int
    weights: int


class _Holder(nn.Module):
    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear


def layer_formats(fp: nn.Module, layers: list[str], schemes: list[str],
                  quantized: nn.Module | None = None) -> dict[str, list[Format]]:
    """Each layer of ``fp`` in each of ``schemes`` (built-in names or ``fp``), by its scheme's own
    handler; a layer's formats sorted by bytes, the first scheme first. ``quantized``: a model already
    in the first scheme, whose modules are that format (no second copy is made)."""
    import copy

    from evalsuite.quantize import parse_scheme, quantize_
    from evalsuite.quantize.recipe import weight_bytes

    configs = {s: parse_scheme(s) for s in schemes if s != FLOAT}
    out = {}
    for name in layers:
        linear = fp.get_submodule(name)
        formats = []
        for i, s in enumerate(schemes):
            if s == FLOAT:
                module = linear
            elif i == 0 and quantized is not None:
                module = quantized.get_submodule(name)
            else:
                module = quantize_(_Holder(copy.deepcopy(linear)), configs[s]).linear
            formats.append(Format(s, module, weight_bytes(module), linear.weight.numel()))
        out[name] = [formats[0], *sorted(formats[1:], key=lambda f: f.bytes)]
    return out


def bits_per_weight(formats: dict[str, list[Format]], assignment: dict[str, str]) -> float:
    """Effective bits per weight of the searched layers in ``assignment`` (layer → scheme; a layer
    not named is in its first format): 8 x their weights' stored bytes / their number of weights,
    as :func:`evalsuite.quantize.recipe.bits_per_weight` counts a quantized model."""
    total = sum(fs[0].weights for fs in formats.values())
    stored = sum(_format(fs, assignment.get(n)).bytes for n, fs in formats.items())
    return 8 * stored / total if total else 0.0


def _format(fs: list[Format], scheme: str | None) -> Format:
    return next((f for f in fs if f.scheme == scheme), fs[0])


def extra_bytes(formats: dict[str, list[Format]], assignment: dict[str, str]) -> int:
    """Weight bytes ``assignment`` adds above every layer in its first format."""
    return sum(_format(fs, assignment.get(n)).bytes - fs[0].bytes for n, fs in formats.items())


def weight_error_energy(fp_linear: nn.Module, module: nn.Module) -> float:
    """||W - dequantize(W)||^2 of one format of a layer (0 for the float layer itself)."""
    if not hasattr(module, "dequantize"):
        return 0.0
    w = fp_linear.weight.float()
    return float((w - module.dequantize().to(w.device).float()).pow(2).sum())


def _start_choice(formats: dict[str, list[Format]], start: dict[str, str] | None) -> dict[str, int]:
    """Each layer's format index in ``start`` (layer → scheme; a layer not named: its first format)."""
    index = {n: {f.scheme: i for i, f in enumerate(fs)} for n, fs in formats.items()}
    return {n: index[n].get((start or {}).get(n), 0) for n in formats}


def _schemes(formats: dict[str, list[Format]], choice: dict[str, int]) -> dict[str, str]:
    """A choice of format indices as layer → scheme."""
    return {n: formats[n][i].scheme for n, i in choice.items()}


def fisher_estimates(fp: nn.Module, formats: dict[str, list[Format]], batches: list[torch.Tensor], seed: int = 0,
                     ) -> tuple[dict[tuple[str, int], float], int]:
    """Every layer's KLD in every one of its formats, estimated from one forward and one backward of
    ``fp`` per calibration batch instead of one forward a layer (the diagonal Fisher score, as
    ModelOpt's AutoQuantize ranks layers):

        est(l, f) = 1/N sum_t sum_c 1/2 (g_tc dy_tc)^2,  dy = x (W_f - W)^T,

    where x is the layer's input at token t, W its fp weight, W_f its weight in format f
    (``dequantize``), and g the gradient of sum_t -log p(y_t) with respect to the layer's output, each
    label y_t drawn from the fp model's own next-token distribution (so that E[g g^T] is the Fisher of
    KL(P || .) at fp; one draw a token, ``seed``). A second-order estimate of KL(P || P with only this
    layer in f), additive over layers, so the search can order every move at once; the search measures
    the variant before it takes a recipe. Returns ``{(layer, format index): nats/token}`` (0 for fp)
    and the number of tokens N."""
    gen: torch.Generator | None = None  # on the logits' device, made at the first window
    est = {(n, j): 0.0 for n, fs in formats.items() for j in range(len(fs))}
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def on_forward(name: str):
        def hook(module, args, output):
            inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g, name=name, w=module.weight: on_grad(name, w, g))
        return hook

    def on_grad(name: str, weight: torch.Tensor, g: torch.Tensor) -> None:
        x = inputs.pop(name).reshape(-1, weight.shape[1]).float()
        g2 = g.reshape(-1, weight.shape[0]).float().pow(2)
        w = weight.detach().float()
        for j, f in enumerate(formats[name]):
            if hasattr(f.module, "dequantize"):
                dy = x @ (f.module.dequantize().to(w.device).float() - w).t()
                est[(name, j)] += 0.5 * float((g2 * dy.pow(2)).sum())

    def grad_from_here(module, args, output):
        return output.detach().requires_grad_(True)

    # where the graph starts: the token embeddings' output (Hugging Face, or gpt-fast's tok_embeddings)
    embed = fp.get_input_embeddings() if hasattr(fp, "get_input_embeddings") else getattr(fp, "tok_embeddings", None)
    if embed is None:
        raise EvalsuiteError(f"the fix's Fisher estimate cannot find the token embeddings of a {type(fp).__name__}")
    flags = [(p, p.requires_grad) for p in fp.parameters()]
    n = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        handles.append(embed.register_forward_hook(grad_from_here))
        handles += [fp.get_submodule(name).register_forward_hook(on_forward(name)) for name in formats]
        with torch.inference_mode(False), torch.enable_grad():
            for x in (b[i: i + 1] for b in batches for i in range(b.shape[0])):  # a window at a time
                # a normal tensor (the caller's may be an inference tensor, which autograd may not save)
                logits = forward_logits(fp, x.clone())[:, :-1].float()
                gen = gen or torch.Generator(device=logits.device).manual_seed(seed)
                with torch.no_grad():
                    probs = torch.softmax(logits.detach()[0], dim=-1)
                    labels = torch.multinomial(probs, 1, generator=gen).reshape(logits.shape[:-1])
                del probs
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                         reduction="sum")
                loss.backward()
                n += labels.numel()
                inputs.clear()
                del logits, loss
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return {k: v / max(n, 1) for k, v in est.items()}, n


def fisher_prior(est: dict[tuple[str, int], float], formats: dict[str, list[Format]],
                 ) -> tuple[dict[tuple[str, int], float], dict[str, float]]:
    """:func:`fisher_estimates` as the search's first ratios: a move of a layer from its first format
    to format j removes est(l, 0) - est(l, j), per extra byte; the sensitivity of a layer is its
    estimated KLD in its first format (what restoring it to fp removes)."""
    ratios, sensitivity = {}, {}
    for n, fs in formats.items():
        sensitivity[n] = est[(n, 0)]
        for j in range(1, len(fs)):
            ratios[(n, j)] = max(0.0, est[(n, 0)] - est[(n, j)]) / max(fs[j].bytes - fs[0].bytes, 1)
    return ratios, sensitivity


def estimated_path(formats: dict[str, list[Format]], ratio: dict[tuple[str, int], float], budget_bytes: int,
                   start: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """The moves (layer, format index) in the order a greedy by estimated KLD reduction per extra byte
    takes them, from ``start``, within ``budget_bytes``: after a layer moves to format j, its larger
    formats compete by what they remove beyond j per byte beyond j (a multiple-choice knapsack's
    greedy); a move that removes nothing is never taken."""
    import heapq

    choice = _start_choice(formats, start)
    used = extra_bytes(formats, _schemes(formats, choice))
    removed = {(n, j): ratio.get((n, j), 0.0) * max(fs[j].bytes - fs[0].bytes, 1)
               for n, fs in formats.items() for j in range(1, len(fs))}

    def gain(n: str, j: int) -> float:  # what format j removes beyond the layer's current one
        return removed.get((n, j), 0.0) - (removed.get((n, choice[n]), 0.0) if choice[n] else 0.0)

    def offers(n: str) -> list[tuple[float, str, int]]:
        fs, i = formats[n], choice[n]
        return [(-gain(n, j) / max(fs[j].bytes - fs[i].bytes, 1), n, j) for j in range(i + 1, len(fs))
                if gain(n, j) > 0]

    # (-ratio, layer, format, the layer's version when offered: an offer made before the layer moved is stale)
    version = dict.fromkeys(formats, 0)
    heap = [(*o, 0) for n in formats for o in offers(n)]
    heapq.heapify(heap)
    path = []
    while heap:
        r, n, j, v = heapq.heappop(heap)
        if v != version[n] or j <= choice[n]:
            continue
        cost = formats[n][j].bytes - formats[n][choice[n]].bytes
        if used + cost > budget_bytes:
            continue
        used += cost
        choice[n] = j
        version[n] += 1
        path.append((n, j))
        for o in offers(n):
            heapq.heappush(heap, (*o, version[n]))
    return path


def path_search(cf: "Counterfactuals", formats: dict[str, list[Format]], target: Callable[[Metrics], bool],
                budget_bytes: int, ratio: dict[tuple[str, int], float], start: dict[str, str] | None = None,
                path: list[tuple[str, int]] | None = None, known: dict[int, Metrics] | None = None,
                scheme: Metrics | None = None) -> FormatSearch:
    """The smallest prefix of the estimated path (:func:`estimated_path`) whose variant meets
    ``target``, measured: the whole path first (if it fails, the budget is spent), then a bisection on
    the prefix length, each probe one forward (about log2 of the path's length in all). The measured
    KLD falls along the path nearly monotonically (each move removes estimated damage), which is what
    the bisection assumes; the recipe it returns is measured, never an estimate. ``path`` and ``known``
    (prefix length → metrics measured before; -1: every layer in its first format, where ``start``
    raised some) let a tightened round continue on the same path; ``scheme``: the metrics of every
    layer in its first format, when the caller measured them already."""
    base_choice = _start_choice(formats, start)
    path = estimated_path(formats, ratio, budget_bytes, start) if path is None else path
    known = {} if known is None else known
    before = set(known)

    def choice_at(k: int) -> dict[str, int]:
        ch = dict(base_choice)
        for n, j in path[:k]:
            ch[n] = j
        return ch

    def measured(k: int) -> Metrics:
        if k not in known:
            ch = choice_at(k)
            known[k] = cf.measure_modules({n: formats[n][i].module for n, i in ch.items() if i})
        return known[k]

    first = -1 if any(base_choice.values()) else 0  # the key of every layer in its first format
    if first not in known and scheme is not None:
        known[first] = scheme
    if first == -1:  # kept (key -1) for a later round
        baseline = known[-1] = known[-1] if -1 in known else cf.measure_modules({})
    else:
        baseline = measured(0)

    def step(k: int) -> dict:
        a = _schemes(formats, choice_at(k))
        previous = max((p for p in known if 0 <= p < k), default=0)
        return {"moves": [f"{n}={formats[n][j].scheme}" for n, j in path[previous:k]], "prefix": k,
                **measured(k).to_dict(), "extra_bytes": extra_bytes(formats, a),
                "bits_per_weight": bits_per_weight(formats, a), "forwards": cf.forwards}

    lo, hi = 0, len(path)
    if target(measured(0)):
        hi, stop = 0, "target met"
    elif not target(measured(hi)):
        lo, stop = hi, ("every layer in fp" if all(c + 1 == len(formats[n]) for n, c in choice_at(hi).items())
                        else "byte budget spent")
    else:
        stop = "target met"
        # the shortest prefix measured to meet it, at least as long as the longest measured to fail
        lo = max([k for k, m in known.items() if k >= 0 and not target(m)], default=0)
        hi = min(k for k, m in known.items() if target(m) and k >= lo)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if target(measured(mid)):
                hi = mid
            else:
                lo = mid
    # the prefixes this call measured and the chosen one, by length; each step's moves are those of the
    # path beyond the longest shorter prefix measured
    ks = sorted({k for k in known if k >= 0 and k not in before} | {hi})
    steps = [step(k) for k in ks]
    final = _schemes(formats, choice_at(hi))
    return FormatSearch(assignment=final, metrics=measured(hi), baseline=baseline, met=target(measured(hi)),
                        extra_bytes=extra_bytes(formats, final), bits_per_weight=bits_per_weight(formats, final),
                        steps=steps, stop_reason=stop, path=path, chosen=ks.index(hi))


@dataclass
class FormatSearch:
    assignment: dict[str, str]  # layer → scheme
    metrics: Metrics
    baseline: Metrics
    met: bool
    extra_bytes: int  # weight bytes above every layer in the first scheme
    bits_per_weight: float  # of the searched layers (:func:`bits_per_weight`)
    steps: list[dict]  # each applied round: its moves, metrics, extra bytes, bits per weight, forwards so far
    stop_reason: str
    path: list[tuple[str, int]] | None = None  # path_search: the estimated path it bisected
    chosen: int = -1  # the index in ``steps`` of the returned assignment


def greedy_formats(cf: Counterfactuals, formats: dict[str, list[Format]], target: Callable[[Metrics], bool],
                   budget_bytes: int, batch: int = 1, rerank: int = 8, start: dict[str, str] | None = None,
                   prior: dict[tuple[str, int], float] | None = None) -> FormatSearch:
    """Raise layers' formats greedily by predicted KLD reduction per extra byte until ``target`` holds.

    A move is one layer to one of its larger formats, measured on top of the current assignment
    (``cf.measure_modules``). The first round measures every move, unless ``prior`` gives each move
    a first estimate of its ratio (:func:`fisher_prior`); every round re-measures moves in the order
    of their last ratio until the ``batch`` best measured ones beat the next one's last ratio, at most
    ``rerank`` of them, and applies up to ``batch`` of the measured moves (distinct layers, positive
    reduction, within ``budget_bytes`` of extra bytes), then re-measures the assignment. A move is
    taken only on a ratio measured on top of the current assignment (interactions measured, not
    assumed additive). ``start``: layer → scheme to begin from (a previous round's recipe, layers
    forced to fp); the search never lowers a layer."""
    choice = _start_choice(formats, start)

    def modules(ch: dict[str, int]) -> dict[str, nn.Module]:
        return {n: formats[n][i].module for n, i in ch.items() if i}

    def step(moves: list[str], m: Metrics) -> dict:
        a = _schemes(formats, choice)
        return {"moves": moves, **m.to_dict(), "extra_bytes": extra_bytes(formats, a),
                "bits_per_weight": bits_per_weight(formats, a), "forwards": cf.forwards}

    baseline = cf.measure_modules({})
    current = cf.measure_modules(modules(choice)) if any(choice.values()) else baseline
    steps = [step([], current)]
    ratio: dict[tuple[str, int], float] = dict(prior or {})
    fresh: set[tuple[str, int]] = set()  # ratios measured on top of the current assignment
    stop = "target met"
    while not target(current):
        used = extra_bytes(formats, _schemes(formats, choice))
        moves = [(n, j) for n, fs in formats.items() for j in range(choice[n] + 1, len(fs))
                 if used + fs[j].bytes - fs[choice[n]].bytes <= budget_bytes]
        if not moves:
            stop = "byte budget spent" if any(choice[n] + 1 < len(fs) for n, fs in formats.items()) else "every layer in fp"
            break
        stale = [m for m in moves if m not in fresh]
        # lazy greedy: re-measure by last ratio until the ``batch`` best measured ones beat the next
        # estimate, at most ``rerank`` of them (a move's ratio rarely grows as the recipe grows)
        lazy = bool(ratio)
        todo = sorted(stale, key=lambda m: ratio.get(m, math.inf), reverse=True)[:rerank] if lazy else stale
        for i, (n, j) in enumerate(todo):
            m = cf.measure_modules(modules({**choice, n: j}))
            # a move that saves bytes (int4 padding a narrow layer to its group) counts as one byte
            cost = max(formats[n][j].bytes - formats[n][choice[n]].bytes, 1)
            ratio[(n, j)] = (current.kld_mean - m.kld_mean) / cost
            fresh.add((n, j))
            good = sorted((ratio[f] for f in fresh if ratio[f] > 0), reverse=True)
            if lazy and i + 1 < len(todo) and len(good) >= batch \
                    and good[batch - 1] >= ratio.get(todo[i + 1], math.inf):
                break
        picked, budget_left = [], budget_bytes - used
        for n, j in sorted(fresh & set(moves), key=lambda m: ratio[m], reverse=True):
            cost = formats[n][j].bytes - formats[n][choice[n]].bytes
            if ratio[(n, j)] <= 0 or len(picked) >= batch or any(n == p for p, _ in picked) or cost > budget_left:
                continue
            picked.append((n, j))
            budget_left -= cost
        if not picked:
            if any(ratio.get(m, math.inf) > 0 for m in moves if m not in fresh):
                continue  # the measured ones do not help; the next best estimates are measured next
            stop = "no remaining move lowers the KLD"
            break
        for n, j in picked:
            # the layer's larger formats: what they remove beyond this one, per byte beyond it (an estimate
            # from the last ratios, re-measured before any is taken)
            fs, i = formats[n], choice[n]
            gain = {k: ratio.get((n, k), math.inf) * max(fs[k].bytes - fs[i].bytes, 1) for k in range(i + 1, len(fs))}
            for k in range(j + 1, len(fs)):
                ratio[(n, k)] = math.inf if math.isinf(gain[k]) or math.isinf(gain[j]) \
                    else (gain[k] - gain[j]) / max(fs[k].bytes - fs[j].bytes, 1)
            for k in range(i + 1, j + 1):
                ratio.pop((n, k), None)
            choice[n] = j
        fresh = set()
        current = cf.measure_modules(modules(choice))
        steps.append(step([f"{n}={formats[n][j].scheme}" for n, j in picked], current))
    final = _schemes(formats, choice)
    return FormatSearch(assignment=final, metrics=current, baseline=baseline, met=target(current),
                        extra_bytes=extra_bytes(formats, final), bits_per_weight=bits_per_weight(formats, final),
                        steps=steps, stop_reason=stop)


def measure_assignment(cf: Counterfactuals, formats: dict[str, list[Format]], assignment: dict[str, str]) -> Metrics:
    """The calibration metrics of the variant with each layer in its assigned format (one forward)."""
    return cf.measure_modules({n: _format(fs, assignment.get(n)).module for n, fs in formats.items()
                               if _format(fs, assignment.get(n)) is not fs[0]})


# --- simple strategies: what a user would try instead of a search, at the search's size ----------

def raised_scheme(fs: list[Format]) -> str:
    """The format a simple strategy gives a layer it raises: int8-wo (Q4_K_M's 6-8 bits for its chosen
    tensors) where it is a larger format than the layer's first, else fp."""
    return "int8-wo" if any(f.scheme == "int8-wo" for f in fs[1:]) else FLOAT


def _fill(formats: dict[str, list[Format]], order: list[list[str]], budget_bytes: int) -> dict[str, str]:
    """Raise each group of layers of ``order`` (a layer, or a block's layers) while the extra bytes stay
    within ``budget_bytes``; a group that does not fit is passed over."""
    out: dict[str, str] = {}
    used = 0
    for group in order:
        cost = sum(_format(formats[n], raised_scheme(formats[n])).bytes - formats[n][0].bytes for n in group)
        if used + cost <= budget_bytes:
            out.update({n: raised_scheme(formats[n]) for n in group})
            used += cost
    return out


def _block_index(name: str) -> int | None:
    block = block_of(name)
    return int(block.rsplit(".", 1)[1]) if block else None


def simple_strategies(fp: nn.Module, formats: dict[str, list[Format]], budget_bytes: int, seed: int = 0,
                      ) -> dict[str, dict]:
    """The simple strategies of the size-quality frontier, each ``{"assignment": layer → scheme}`` or
    ``{"skipped": why}``; every layer a strategy raises goes to :func:`raised_scheme`:

    - ``q4_k_m-like``: llama.cpp Q4_K_M's rule, v_proj and down_proj of every other block (0, 2, ...);
      its own size, not ``budget_bytes``;
    - ``lowest-sqnr``: layers by weight SQNR (10 log10 ||W||^2 / ||W - dequantize(W)||^2), lowest first;
    - ``first-last``: whole blocks from both ends (0, N-1, 1, N-2, ...);
    - ``random``: layers in a random order (``seed``).

    All but the first take layers while the extra bytes stay within ``budget_bytes``."""
    import random

    layers = list(formats)
    out: dict[str, dict] = {}
    rule = [n for n in layers if n.rsplit(".", 1)[-1] in ("v_proj", "down_proj")
            and (_block_index(n) is not None and _block_index(n) % 2 == 0)]
    out["q4_k_m-like"] = ({"assignment": {n: raised_scheme(formats[n]) for n in rule}} if rule else
                          {"skipped": "no v_proj or down_proj layer inside numbered blocks"})
    if all(hasattr(formats[n][0].module, "dequantize") for n in layers):
        sqnr = {}
        for n in layers:
            err = weight_error_energy(fp.get_submodule(n), formats[n][0].module)
            power = float(fp.get_submodule(n).weight.float().pow(2).sum())
            sqnr[n] = 10 * math.log10(power / err) if err > 0 else math.inf
        out["lowest-sqnr"] = {"assignment": _fill(formats, [[n] for n in sorted(layers, key=sqnr.get)], budget_bytes)}
    else:
        out["lowest-sqnr"] = {"skipped": "the scheme's layers have no dequantize(): no weight SQNR"}
    blocks: dict[str, list[str]] = {}
    for n in layers:
        blocks.setdefault(block_of(n) or n, []).append(n)
    names = list(blocks)
    ends = [names[i // 2] if i % 2 == 0 else names[-1 - i // 2] for i in range(len(names))]
    out["first-last"] = {"assignment": _fill(formats, [blocks[b] for b in ends], budget_bytes)}
    order = layers[:]
    random.Random(seed).shuffle(order)
    out[f"random-{seed}"] = {"assignment": _fill(formats, [[n] for n in order], budget_bytes)}
    return out


def to_recipe(default: str, assignment: dict[str, str]) -> dict:
    """The recipe file's content: ``default`` for every layer but those the search raised."""
    from evalsuite.quantize.recipe import SCHEMA

    return {"schema": SCHEMA, "default": default,
            "layers": [{"pattern": n, "scheme": s} for n, s in assignment.items() if s != default]}
