"""Stage ``layers``: which layer broke? Per-layer and per-block error of each quantized variant.

Three views, each against the fp model:

* weight space, per quantized linear layer (``W`` the fp weight, ``Ŵ`` the module's ``dequantize()``):
  ``weight_sqnr_db = 10·log10(‖W‖² / ‖W − Ŵ‖²)``, ``weight_rel_error = ‖W − Ŵ‖ / ‖W‖`` (Frobenius),
  ``weight_max_abs_error = max |W − Ŵ|``, and ``clipped_fraction``: the share of the integer codes
  that sit at either end of the scheme's code range (saturated values).
* output space, on real activations: forward hooks on the fp model's linear layers catch each
  layer's input ``x`` on calibration text (WikiText-2 *valid*, never the test text), the quantized
  layer runs on the same ``x``, and ``output_sqnr_db = 10·log10(Σ‖y‖² / Σ‖y − ŷ‖²)`` over all
  calibration tokens; ``output_cosine`` is the mean over tokens of cos(y_t, ŷ_t). Sums are
  accumulated inside the hook, so no activation outlives its layer's call.
* end to end, per transformer block: the fp and the quantized model each run the whole calibration
  batch, and ``hidden_sqnr_db`` compares block outputs, so error accumulated with depth shows; the
  first block whose SQNR drop stands out from the median drop (``BlockSummary``) is where error jumps.

Which layers are quantized is found by pairing, so the stage also works on models it did not
quantize (a user's handler, torchao, a ``--variant-model`` checkpoint): modules are paired by
qualified name with the fp model's ``nn.Linear`` layers, and a pair counts as quantized when the
variant's module type, its weight's type, dtype or shape, or the weight's values differ. ``Ŵ`` is
the module's ``dequantize()``, else its weight's (torchao tensor subclasses), else a float weight
itself (a dequantized GGUF), else gpt-fast's int8 ``weight × scales``; with none of these the
weight view is skipped and the reason recorded, and output SQNR still ranks the layer.

A layer is under threshold when its weight or output SQNR is below the floor of its scheme
(``layer_thresholds``); a layer the scheme's policy keeps in float (e.g. the output head) but that
is quantized anyway has an infinite floor. Layers are ranked by their headroom
``min(weight_sqnr_db − floor_w, output_sqnr_db − floor_o)``; the lowest is named ``worst``.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from evalsuite.errors import EvalsuiteError
from evalsuite.measure import Stage, tokenization
from evalsuite.measure.layer_capture import (Calibration, PowerSums, calibration_batches, calibration_tokens,
                                             dequantized_weight, measure_activations, paired_layers, sqnr_db,
                                             weight_errors)
from evalsuite.results import json_number
from evalsuite.measure.tokenization import bos_rule
from evalsuite.measure.layer_thresholds import FLOAT_LAYER, Floors, Thresholds, load_thresholds
from evalsuite.results import Metric, Results

STAGE_NAME = "layers"
DEFAULT_TOKENS_GPU = 16384
DEFAULT_TOKENS_CPU = 2048
DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_JUMP_DB = 3.0
DEFAULT_TOP = 10
DEFAULT_PEER_DB = 4.5
MIN_PEERS = 4

DEF_WEIGHT_SQNR = "10*log10(||W||^2 / ||W - dequant(Q)||^2), W the fp weight, Frobenius norms"
DEF_WEIGHT_REL = "||W - dequant(Q)||_F / ||W||_F"
DEF_WEIGHT_MAX = "max over elements of |W - dequant(Q)|"
DEF_CLIPPED = "fraction of integer weight codes at either end of the scheme's code range"
DEF_OUTPUT_SQNR = ("10*log10(sum ||y||^2 / sum ||y - y_q||^2) over calibration tokens; y the fp layer's output, "
                   "y_q the quantized layer's output on the same fp-model input")
DEF_OUTPUT_COS = "mean over calibration tokens of cosine(y_t, y_q_t) of the layer outputs on the same fp-model input"
DEF_HIDDEN_SQNR = ("10*log10(sum ||h||^2 / sum ||h - h_q||^2) of the block's output hidden state, fp model vs "
                   "quantized model each run end to end on the same calibration tokens")


# --- verdicts --------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    name: str
    metrics: dict[str, float]
    floors: Floors
    expected_float: bool = False
    peer_median_db: dict[str, float] = field(default_factory=dict)

    @property
    def headroom_db(self) -> float:
        """min(weight SQNR − floor, output SQNR − floor); −inf for a layer that should be float."""
        margins = []
        for view in ("weight_sqnr_db", "output_sqnr_db"):
            value, floor = self.metrics.get(view), getattr(self.floors, view)
            if value is None or math.isnan(value):
                continue
            margins.append(-math.inf if math.isinf(floor) and not math.isinf(value) else value - floor)
        return min(margins) if margins else math.nan

    @property
    def under(self) -> bool:
        return self.headroom_db < 0


@dataclass
class BlockSummary:
    """Where error enters along depth.

    ``drops_db[i] = SQNR_{i−1} − SQNR_i`` for blocks ``i ≥ 1``; ``excess_db[i] = drops_db[i] −
    median(drops_db[1:])``. Measured against the model's own median drop because honest error already
    grows with depth (equal independent error per block alone costs 3 dB from block 0 to block 1).
    """

    sqnr_db: list[float]
    floor_db: float
    jump_db: float
    drops_db: list[float] = field(init=False)
    excess_db: list[float] = field(init=False)

    def __post_init__(self):
        self.drops_db = [math.nan] + [a - b for a, b in zip(self.sqnr_db, self.sqnr_db[1:])]
        finite = [d for d in self.drops_db[1:] if math.isfinite(d)]
        median = statistics.median(finite) if finite else math.nan
        self.excess_db = [d - median if math.isfinite(d) else math.nan for d in self.drops_db]

    @property
    def worst(self) -> int | None:
        finite = [(s, i) for i, s in enumerate(self.sqnr_db) if not math.isnan(s)]
        return min(finite)[1] if finite else None

    @property
    def largest_jump(self) -> int | None:
        """The block whose SQNR drop most exceeds the median drop."""
        jumps = [(e, i) for i, e in enumerate(self.excess_db) if not math.isnan(e)]
        return max(jumps)[1] if jumps else None

    @property
    def first_jump(self) -> int | None:
        """The first block that is under the floor or whose SQNR drop exceeds the median drop by more
        than ``jump_db``; None when error grows smoothly and stays above the floor."""
        for i, s in enumerate(self.sqnr_db):
            if s < self.floor_db or self.excess_db[i] > self.jump_db:
                return i
        return None

    @property
    def under(self) -> list[int]:
        return [i for i, s in enumerate(self.sqnr_db) if s < self.floor_db]


def layer_kind(name: str) -> str:
    """The name with block indices starred: ``model.layers.3.mlp.down_proj`` → ``model.layers.*.mlp.down_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def apply_peer_floors(rows: list[LayerRow], peer_db: float, min_peers: int = MIN_PEERS,
                      views: tuple[str, ...] = ("weight_sqnr_db",)) -> None:
    """Raise each layer's floor to ``median(peers) − peer_db`` where that is higher.

    Peers are the layers of the same kind (same name up to block index) in the same variant, or all
    quantized layers of the variant where a kind has fewer than ``min_peers``. An absolute floor cannot
    catch a subtle fault (floor instead of round costs 6 dB) on every model: honest SQNR differs by more
    than that between models, but within one model the weight SQNR of a kind sits within about 3 dB of
    its median (SmolLM2-135M, all three schemes). Output SQNR is left to the absolute floor: it follows
    each layer's activations, and honest int8-dq layers sit up to 6.5 dB under their kind's median.
    """
    for view in views:
        by_kind: dict[str, list[float]] = {}
        for r in rows:
            if view in r.metrics and math.isfinite(r.metrics[view]):
                by_kind.setdefault(layer_kind(r.name), []).append(r.metrics[view])
        everything = [v for vals in by_kind.values() for v in vals]
        for r in rows:
            if r.expected_float:
                continue
            peers = by_kind.get(layer_kind(r.name), [])
            peers = peers if len(peers) >= min_peers else everything
            if len(peers) < min_peers:
                continue
            median = statistics.median(peers)
            r.peer_median_db[view] = median
            if median - peer_db > getattr(r.floors, view):
                r.floors = replace(r.floors, **{view: median - peer_db})


def expected_float_layers(fp: nn.Module, config: Any, skip: tuple[str, ...]) -> set[str] | None:
    """Linear layers the scheme's policy keeps in float (None when the config is not a known one)."""
    from evalsuite.quantize.policy import LayerPolicy

    if config is None or getattr(config, "include_head", None) is None:
        return None  # not a known scheme, or a handler that picks its own layers
    chosen = set(LayerPolicy(include_head=config.include_head, skip=skip).select(fp))
    return {n for n, m in fp.named_modules() if isinstance(m, nn.Linear)} - chosen


# --- the stage -------------------------------------------------------------------------------------


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--layer-tokens", type=int,
                   help=f"calibration tokens from WikiText-2 valid "
                        f"(default {DEFAULT_TOKENS_GPU} on GPU, {DEFAULT_TOKENS_CPU} on CPU)")
    g.add_argument("--layer-seq-len", type=int, default=DEFAULT_SEQ_LEN, help="tokens per calibration sequence")
    g.add_argument("--layer-batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help="tokens per forward pass (bounds the block outputs held in memory)")
    g.add_argument("--layer-thresholds", metavar="FILE", help="YAML/JSON SQNR floors per scheme and layer pattern")
    g.add_argument("--layer-threshold-db", type=float,
                   help="one SQNR floor for the weight and output views of every scheme (overrides the defaults)")
    g.add_argument("--layer-jump-db", type=float, default=DEFAULT_JUMP_DB,
                   help="error jumps at the first block whose hidden-SQNR drop exceeds the median drop by this many dB")
    g.add_argument("--layer-peer-db", type=float, default=DEFAULT_PEER_DB,
                   help="also flag a layer whose weight SQNR is this many dB below the median of its peers "
                        "(same kind, same variant)")
    g.add_argument("--layer-top", type=int, default=DEFAULT_TOP, help="worst layers to list per variant")


@dataclass(frozen=True)
class Options:
    tokens: int
    seq_len: int
    batch_tokens: int
    thresholds: Thresholds
    jump_db: float
    top: int
    peer_db: float = DEFAULT_PEER_DB


def options(ctx) -> Options:
    tokens = ctx.option("layer_tokens") or (DEFAULT_TOKENS_GPU if ctx.device.type == "cuda" else DEFAULT_TOKENS_CPU)
    seq_len = ctx.option("layer_seq_len", DEFAULT_SEQ_LEN)
    batch_tokens = ctx.option("layer_batch_tokens", DEFAULT_BATCH_TOKENS)
    top = ctx.option("layer_top", DEFAULT_TOP)
    for flag, value in (("--layer-tokens", tokens), ("--layer-seq-len", seq_len),
                        ("--layer-batch-tokens", batch_tokens), ("--layer-top", top)):
        if value < 1:
            raise EvalsuiteError(f"{flag} must be at least 1, got {value}")
    max_len = getattr(ctx.loaded.info, "max_seq_len", None)
    if max_len and seq_len > max_len:
        raise EvalsuiteError(f"--layer-seq-len {seq_len} is longer than the model's context of {max_len}")
    if ctx.limit is not None:
        tokens = min(tokens, ctx.limit * seq_len)
    thresholds = load_thresholds(ctx.option("layer_thresholds"))
    flat = ctx.option("layer_threshold_db")
    if flat is not None:  # weight and output floors of every scheme and layer; hidden floors stay
        table = {pattern: {**entry, "weight_sqnr_db": flat, "output_sqnr_db": flat, "layers": {}}
                 for pattern, entry in thresholds.table.items()}
        thresholds = Thresholds(table, source=f"{thresholds.source}, --layer-threshold-db {flat}")
    return Options(tokens, seq_len, batch_tokens, thresholds, ctx.option("layer_jump_db", DEFAULT_JUMP_DB), top,
                   ctx.option("layer_peer_db", DEFAULT_PEER_DB))


def load_calibration(ctx, opts: Options) -> Calibration:
    from evalsuite.measure.corpus import wikitext

    text, source = wikitext("valid", ctx.data_dir)
    rule = bos_rule(ctx.tokenizer)
    tokenization.note(ctx.results.run, rule)
    ids = calibration_tokens(ctx.tokenizer, text, opts.tokens)
    seq_len = min(opts.seq_len, opts.tokens)
    return Calibration(calibration_batches(ids, opts.tokens, seq_len, opts.batch_tokens, rule.bos_id), source,
                       seq_len, rule.bos)


def run(ctx) -> None:
    from evalsuite.distributed import gather, shard

    if not ctx.quantized:
        raise EvalsuiteError("stage 'layers' compares quantized variants with fp; --quant gave none")
    opts = options(ctx)
    calib = load_calibration(ctx, opts)
    fp = ctx.fp
    skip = ctx.skip

    mine = [b for _, b in shard(calib.batches, ctx.rank, ctx.world_size)]
    layer_sums, block_sums = measure_activations(fp, ctx.quantized, mine, ctx.device,
                                                 progress=lambda it, **kw: ctx.progress(it, total=len(mine), **kw))
    local = {v: ({n: s.values() for n, s in layer_sums[v].items()}, [s.values() for s in block_sums[v]])
             for v in ctx.quantized}
    parts = gather([(ctx.rank, local)], ctx.world_size)

    details = ctx.results.details.setdefault(STAGE_NAME, {})
    details["calibration"] = {"source": calib.source, "split": "valid", "tokens": calib.n_tokens,
                              "seq_len": calib.seq_len, "bos": calib.bos,
                              "thresholds": opts.thresholds.source}
    for variant, qmodel in ctx.quantized.items():
        layers = {n: PowerSums.merge([p[variant][0][n] for p in parts]) for n in layer_sums[variant]}
        blocks = [PowerSums.merge([p[variant][1][i] for p in parts]) for i in range(len(block_sums[variant]))]
        expected_float = expected_float_layers(fp, ctx.configs.get(variant), skip)
        rows = layer_rows(fp, qmodel, variant, layers, opts.thresholds, expected_float)
        if not rows:
            ctx.results.add_error(STAGE_NAME, f"no linear layer of {variant} pairs by name with a changed one of the "
                                              f"fp model (module names differ, or nothing was quantized); layer "
                                              f"view not measured", variant=variant)
            ctx.checkpoint()
            continue
        apply_peer_floors(rows, opts.peer_db)
        summary = BlockSummary([sqnr_db(s[0], s[1]) for s in blocks], opts.thresholds.hidden_floor(variant),
                               opts.jump_db)
        pending = PendingRecords()
        record(pending, variant, rows, summary, blocks, opts, calib)
        pending.flush(ctx.results)
        details[variant] = detail_table(rows, summary, opts.top)
        ctx.checkpoint()
        if ctx.is_writer:
            skipped = [r.metrics["_weight_skipped"] for r in rows if "_weight_skipped" in r.metrics]
            note = f"; weight view skipped for {len(skipped)} layers: {skipped[0]}" if skipped else ""
            print(f"\nlayers {variant}: worst {min(opts.top, len(rows))} of {len(rows)} quantized layers "
                  f"(floor: under = below its threshold); error jumps at {_block(summary.first_jump) or 'no block'}, "
                  f"worst block {_block(summary.worst)}{note}\n{format_worst(rows, opts.top)}", file=sys.stderr)


def layer_rows(fp: nn.Module, qmodel: nn.Module, variant: str, sums: dict[str, tuple[float, float, float, int]],
               thresholds: Thresholds, expected_float: set[str] | None) -> list[LayerRow]:
    from evalsuite.load.tp import full_weight, unsharded

    rows = []
    for name, qmod in paired_layers(fp, qmodel).items():
        # under --tp the whole layers, gathered from their shards: the metrics are one process's
        weight, qmod = full_weight(fp.get_submodule(name)), unsharded(qmod)
        w_hat, how = dequantized_weight(qmod, weight.shape)
        metrics: dict[str, Any] = weight_errors(weight, qmod, w_hat) if w_hat is not None else {"_weight_skipped": how}
        signal, noise, cosine, tokens = sums.get(name, (0.0, 0.0, 0.0, 0))
        if tokens:
            metrics["output_sqnr_db"] = sqnr_db(signal, noise)
            metrics["output_cosine"] = cosine / tokens
        metrics["_tokens"] = tokens
        metrics["_n_weights"] = weight.numel()
        should_be_float = expected_float is not None and name in expected_float
        floors = FLOAT_LAYER if should_be_float else thresholds.floors(variant, name)
        rows.append(LayerRow(name, metrics, floors, should_be_float))
    return rows


METRIC_SPECS = {
    # metric: (unit, higher_is_better, definition)
    "weight_sqnr_db": ("dB", True, DEF_WEIGHT_SQNR),
    "weight_rel_error": ("ratio", False, DEF_WEIGHT_REL),
    "weight_max_abs_error": ("abs", False, DEF_WEIGHT_MAX),
    "clipped_fraction": ("fraction", False, DEF_CLIPPED),
    "output_sqnr_db": ("dB", True, DEF_OUTPUT_SQNR),
    "output_cosine": ("cosine", True, DEF_OUTPUT_COS),
}


class PendingRecords:
    """Collects one variant's records and adds them to the results in one step: ``Results.add``
    rescans every record per call, which for 1,300 records a variant costs seconds."""

    def __init__(self):
        self.metrics: list[Metric] = []

    def add(self, **kwargs: Any) -> None:
        self.metrics.append(Metric(**kwargs))

    def flush(self, results: Results) -> None:
        results.extend(self.metrics)


def _floor_extra(row: LayerRow, metric: str) -> dict[str, Any]:
    if not metric.endswith("sqnr_db"):
        return {}
    floor = getattr(row.floors, metric)
    extra = {"floor_db": json_number(floor), "under_threshold": row.metrics[metric] < floor}
    if metric in row.peer_median_db:
        extra["peer_median_db"] = row.peer_median_db[metric]
    return extra


def _ranked(rows: list[LayerRow]) -> list[LayerRow]:
    return sorted(rows, key=lambda r: (math.inf if math.isnan(r.headroom_db) else r.headroom_db, r.name))


def record(results, variant: str, rows: list[LayerRow], summary: BlockSummary, blocks, opts: Options,
           calib: Calibration) -> None:
    for row in rows:
        n_weights = row.metrics.get("_n_weights")
        for metric, (unit, hib, definition) in METRIC_SPECS.items():
            if metric not in row.metrics:
                continue
            is_output = metric.startswith("output_")
            results.add(stage=STAGE_NAME, task=row.name, variant=variant, metric=metric, value=row.metrics[metric],
                        unit=unit, n=row.metrics["_tokens"] if is_output else (n_weights or 0), higher_is_better=hib,
                        definition=definition,
                        extra=_floor_extra(row, metric))
    for i, s in enumerate(summary.sqnr_db):
        results.add(stage=STAGE_NAME, task=f"block.{i}", variant=variant, metric="hidden_sqnr_db", value=s, unit="dB",
                    n=int(blocks[i][3]), higher_is_better=True, definition=DEF_HIDDEN_SQNR,
                    extra={"drop_db": json_number(summary.drops_db[i]),
                           "excess_db": json_number(summary.excess_db[i]), "floor_db": json_number(summary.floor_db)})

    ranked = _ranked(rows)
    under = [r.name for r in ranked if r.under]
    base = opts.thresholds.floors(variant, "")  # the scheme's floors before layer patterns and peer rule
    summary_extra = {
        "worst": ranked[0].name if ranked else None,
        "threshold_db": base.output_sqnr_db,
        "weight_threshold_db": base.weight_sqnr_db,
        "peer_db": opts.peer_db,
        "under_threshold": under,
        "expected_float_but_quantized": [r.name for r in rows if r.expected_float],
        "worst_layers": [r.name for r in ranked[: opts.top]],
        "layers": len(rows),
        "thresholds": opts.thresholds.source,
    }
    weighed = [r for r in rows if "weight_sqnr_db" in r.metrics]
    weight_vals = [r.metrics["weight_sqnr_db"] for r in weighed]
    output_vals = [r.metrics["output_sqnr_db"] for r in rows if "output_sqnr_db" in r.metrics]
    skipped = {r.name: r.metrics["_weight_skipped"] for r in rows if "_weight_skipped" in r.metrics}
    results.add(stage=STAGE_NAME, task="all", variant=variant, metric="min_weight_sqnr_db",
                value=min(weight_vals) if weight_vals else None, unit="dB", n=len(weight_vals), higher_is_better=True,
                definition="lowest weight_sqnr_db over the quantized linear layers",
                extra={"worst": min(weighed, key=lambda r: r.metrics["weight_sqnr_db"]).name if weighed else None,
                       **({"weight_view_skipped": {"layers": len(skipped), "reason": next(iter(skipped.values()))}}
                          if skipped else {})})
    results.add(stage=STAGE_NAME, task="all", variant=variant, metric="min_output_sqnr_db",
                value=min(output_vals) if output_vals else None, unit="dB", n=len(output_vals), higher_is_better=True,
                definition="lowest output_sqnr_db over the quantized linear layers",
                extra={"worst": min((r for r in rows if "output_sqnr_db" in r.metrics),
                                    key=lambda r: r.metrics["output_sqnr_db"]).name if output_vals else None,
                       "calibration_tokens": calib.n_tokens})
    results.add(stage=STAGE_NAME, task="all", variant=variant, metric="layers_under_threshold", value=float(len(under)),
                unit="layers", n=len(rows), higher_is_better=False,
                definition="quantized linear layers whose weight or output SQNR is below the scheme's floor "
                           "(infinite for a layer the scheme's policy keeps in float); ranked by headroom "
                           "min(weight_sqnr_db - floor, output_sqnr_db - floor)",
                extra=summary_extra)
    finite = [s for s in summary.sqnr_db if not math.isnan(s)]
    results.add(stage=STAGE_NAME, task="all", variant=variant, metric="min_hidden_sqnr_db",
                value=min(finite) if finite else None, unit="dB", n=len(finite), higher_is_better=True,
                definition="lowest hidden_sqnr_db over the transformer blocks",
                extra={"worst_block": _block(summary.worst), "first_jump_block": _block(summary.first_jump),
                       "largest_jump_block": _block(summary.largest_jump), "jump_db": summary.jump_db,
                       "threshold_db": summary.floor_db, "under_threshold": [_block(i) for i in summary.under]})


def _block(i: int | None) -> str | None:
    return None if i is None else f"block.{i}"


def detail_table(rows: list[LayerRow], summary: BlockSummary, top: int) -> dict[str, Any]:
    """The worst ``top`` layers and every block, for reports (floats only; JSON-safe via str for inf)."""
    return {
        "worst_layers": [
            {"layer": r.name, "headroom_db": json_number(r.headroom_db), "under_threshold": r.under,
             "expected_float": r.expected_float,
             **{k: json_number(r.metrics.get(k)) for k in METRIC_SPECS if k in r.metrics}}
            for r in _ranked(rows)[:top]
        ],
        "blocks": [{"block": i, "hidden_sqnr_db": json_number(s), "drop_db": json_number(summary.drops_db[i]),
                    "excess_db": json_number(summary.excess_db[i])}
                   for i, s in enumerate(summary.sqnr_db)],
    }


def format_worst(rows: list[LayerRow], top: int = DEFAULT_TOP) -> str:
    """A plain-text table of the worst layers, under-threshold ones marked ``under`` (their floor)."""
    from tabulate import tabulate

    table = [["under" if r.under else "", r.name, r.metrics.get("weight_sqnr_db"), r.metrics.get("output_sqnr_db"),
              r.metrics.get("output_cosine"), r.metrics.get("clipped_fraction"), r.headroom_db]
             for r in _ranked(rows)[:top]]
    return tabulate(table, headers=["floor", "layer", "weight dB", "output dB", "cosine", "clipped", "headroom dB"],
                    floatfmt=".4g")


STAGE = Stage(name=STAGE_NAME, help="per-layer weight/output SQNR and per-block hidden-state SQNR vs fp",
              run=run, add_arguments=add_arguments)
