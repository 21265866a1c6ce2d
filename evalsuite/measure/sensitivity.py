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
- leave-one-out sensitivity of unit u: ``kld_drop`` = kld_mean(∅) - kld_mean({u}), the KLD removed by
  restoring only u (a unit is one linear layer, or one block's quantized linears);
- the greedy search (:func:`greedy_restore`) adds, while the target is not met and the budget
  allows, the unit with the largest KLD drop per parameter given the set already chosen. Each step
  re-measures candidates on top of the chosen set (interactions measured, not assumed additive) in
  the order of their last measured drop, until a re-measured one beats the next one's last drop, at
  most ``rerank`` of them (lazy greedy: a unit's drop rarely grows as the set grows).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Unit:
    """What the search restores as one: one layer (``granularity`` layer) or one block's quantized
    layers. ``pattern`` is its ``--skip-layers`` spelling; ``params`` its linear weights' parameters."""

    name: str
    layers: tuple[str, ...]
    pattern: str
    params: int


def make_units(fp: nn.Module, layer_names: list[str], granularity: str = "layer") -> list[Unit]:
    params = {n: fp.get_submodule(n).weight.numel() for n in layer_names}
    if granularity == "layer":
        return [Unit(n, (n,), n, params[n]) for n in layer_names]
    if granularity != "block":
        raise EvalsuiteError(f"--fix-granularity {granularity!r}: expected layer or block")
    groups: dict[str, list[str]] = {}
    for n in layer_names:
        groups.setdefault(block_of(n) or n, []).append(n)
    return [Unit(b, tuple(ls), f"{b}.*" if block_of(ls[0]) == b else b, sum(params[n] for n in ls))
            for b, ls in groups.items()]


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

    def measure(self, layers: Iterable[str] = ()) -> Metrics:
        return self.measure_modules({name: self.fp.get_submodule(name) for name in layers})

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


@dataclass
class Step:
    unit: str | None
    metrics: Metrics
    params: int  # parameters restored so far
    forwards: int  # counterfactual forwards so far

    def to_dict(self) -> dict:
        return {"unit": self.unit, **self.metrics.to_dict(), "params": self.params, "forwards": self.forwards}


@dataclass
class Search:
    chosen: list[Unit]
    metrics: Metrics
    met: bool
    steps: list[Step]
    sensitivity: dict[str, float]  # leave-one-out KLD drop per unit (nats)
    baseline: Metrics
    stop_reason: str
    forced: list[Unit] = field(default_factory=list)


def greedy_restore(cf: Counterfactuals, units: list[Unit], target: Callable[[Metrics], bool], budget_params: int,
                   rerank: int = 8, forced: Iterable[Unit] = ()) -> Search:
    """Choose units to restore, greedily by KLD drop per parameter, until ``target`` holds (see the
    module docstring); ``forced`` units are in the set from the start."""
    forced = list(forced)
    chosen = list(forced)
    layers = [l for u in chosen for l in u.layers]
    used = sum(u.params for u in chosen)
    baseline = cf.measure()
    current = cf.measure(layers) if forced else baseline
    steps = [Step(None, current, used, cf.forwards)]
    rest = [u for u in units if u not in chosen]
    units_by_name = {u.name: u for u in units}
    # leave-one-out: each unit alone on top of the forced set (the plain sensitivity when none)
    fresh = {u.name: cf.measure(layers + list(u.layers)) for u in rest}
    drop = {name: current.kld_mean - m.kld_mean for name, m in fresh.items()}
    sensitivity = dict(drop)
    stop = "target met"
    while not target(current):
        fits = [u for u in rest if used + u.params <= budget_params]
        if not fits:
            stop = "byte budget spent" if rest else "every layer restored"
            break
        if not fresh:  # lazy greedy: re-measure by last drop until a fresh one beats the next stale one
            order = sorted(fits, key=lambda u: drop[u.name] / u.params, reverse=True)[:rerank]
            for i, u in enumerate(order):
                m = cf.measure(layers + list(u.layers))
                fresh[u.name] = m
                drop[u.name] = current.kld_mean - m.kld_mean
                best_fresh = max(drop[n] / units_by_name[n].params for n in fresh)
                if i + 1 < len(order) and best_fresh >= drop[order[i + 1].name] / order[i + 1].params:
                    break
        candidates = [u for u in fits if u.name in fresh]
        best = max(candidates, key=lambda u: drop[u.name] / u.params)
        if drop[best.name] <= 0:
            stop = "no remaining layer lowers the KLD"
            break
        chosen.append(best)
        rest.remove(best)
        layers += list(best.layers)
        used += best.params
        current = fresh[best.name]
        steps.append(Step(best.name, current, used, cf.forwards))
        fresh = {}
    return Search(chosen=chosen, metrics=current, met=target(current), steps=steps, sensitivity=sensitivity,
                  baseline=baseline, stop_reason=stop, forced=forced)


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
    """One layer in one scheme: its runtime module and its weight bytes as stored (no bias)."""

    scheme: str
    module: nn.Module
    bytes: int


class _Holder(nn.Module):
    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear


def layer_formats(fp: nn.Module, layers: list[str], schemes: list[str]) -> dict[str, list[Format]]:
    """Each layer of ``fp`` in each of ``schemes`` (built-in names or ``fp``), by its scheme's own
    handler; a layer's formats sorted by bytes, the first scheme first."""
    import copy

    from evalsuite.quantize import parse_scheme, quantize_
    from evalsuite.quantize.recipe import weight_bytes

    configs = {s: parse_scheme(s) for s in schemes if s != FLOAT}
    out = {}
    for name in layers:
        linear = fp.get_submodule(name)
        formats = []
        for s in schemes:
            module = linear if s == FLOAT else quantize_(_Holder(copy.deepcopy(linear)), configs[s]).linear
            formats.append(Format(s, module, weight_bytes(module)))
        out[name] = [formats[0], *sorted(formats[1:], key=lambda f: f.bytes)]
    return out


@dataclass
class FormatSearch:
    assignment: dict[str, str]  # layer → scheme
    metrics: Metrics
    baseline: Metrics
    met: bool
    extra_bytes: int  # weight bytes above every layer in the first scheme
    steps: list[dict]
    stop_reason: str


def greedy_formats(cf: Counterfactuals, formats: dict[str, list[Format]], target: Callable[[Metrics], bool],
                   budget_bytes: int, batch: int = 1, rerank: int = 8, start: dict[str, int] | None = None,
                   ) -> FormatSearch:
    """Raise layers' formats greedily by predicted KLD reduction per extra byte until ``target`` holds.

    A move is one layer to one of its larger formats, measured on top of the current assignment
    (``cf.measure_modules``). The first round measures every move; later rounds re-measure the
    ``rerank`` best by their last ratio. Each round applies up to ``batch`` moves (distinct layers,
    positive reduction, within ``budget_bytes`` of extra bytes), then re-measures the assignment.
    ``start``: a previous search's format indices, to continue from (a tightened target)."""
    choice = dict(start or {name: 0 for name in formats})

    def modules(ch: dict[str, int]) -> dict[str, nn.Module]:
        return {n: formats[n][i].module for n, i in ch.items() if i}

    def extra(ch: dict[str, int]) -> int:
        return sum(formats[n][i].bytes - formats[n][0].bytes for n, i in ch.items())

    baseline = cf.measure_modules({})
    current = cf.measure_modules(modules(choice)) if any(choice.values()) else baseline
    steps = [{"moves": [], **current.to_dict(), "extra_bytes": extra(choice), "forwards": cf.forwards}]
    ratio: dict[tuple[str, int], float] = {}
    stop = "target met"
    first = True
    while not target(current):
        used = extra(choice)
        moves = [(n, j) for n, fs in formats.items() for j in range(choice[n] + 1, len(fs))
                 if used + fs[j].bytes - fs[choice[n]].bytes <= budget_bytes]
        if not moves:
            stop = "byte budget spent" if any(choice[n] + 1 < len(fs) for n, fs in formats.items()) else "every layer in fp"
            break
        todo = moves if first else sorted(moves, key=lambda m: ratio.get(m, math.inf), reverse=True)[:rerank]
        first = False
        for n, j in todo:
            m = cf.measure_modules(modules({**choice, n: j}))
            # a move that saves bytes (int4 padding a narrow layer to its group) counts as one byte
            cost = max(formats[n][j].bytes - formats[n][choice[n]].bytes, 1)
            ratio[(n, j)] = (current.kld_mean - m.kld_mean) / cost
        picked, budget_left = [], budget_bytes - used
        for n, j in sorted(todo, key=lambda m: ratio[m], reverse=True):
            cost = formats[n][j].bytes - formats[n][choice[n]].bytes
            if ratio[(n, j)] <= 0 or len(picked) >= batch or any(n == p for p, _ in picked) or cost > budget_left:
                continue
            picked.append((n, j))
            budget_left -= cost
        if not picked:
            stop = "no remaining move lowers the KLD"
            break
        for n, j in picked:
            choice[n] = j
            ratio = {k: v for k, v in ratio.items() if k[0] != n}  # its other moves now cost differently
        current = cf.measure_modules(modules(choice))
        steps.append({"moves": [f"{n}={formats[n][j].scheme}" for n, j in picked], **current.to_dict(),
                      "extra_bytes": extra(choice), "forwards": cf.forwards})
    return FormatSearch(assignment={n: formats[n][i].scheme for n, i in choice.items()}, metrics=current,
                        baseline=baseline, met=target(current), extra_bytes=extra(choice), steps=steps,
                        stop_reason=stop)


def to_recipe(default: str, assignment: dict[str, str]) -> dict:
    """The recipe file's content: ``default`` for every layer but those the search raised."""
    from evalsuite.quantize.recipe import SCHEMA

    return {"schema": SCHEMA, "default": default,
            "layers": [{"pattern": n, "scheme": s} for n, s in assignment.items() if s != default]}
