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
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.errors import EvalsuiteError
from evalsuite.measure import Stage, tokenization
from evalsuite.results import json_number
from evalsuite.measure.tokenization import bos_rule
from evalsuite.measure.layer_thresholds import FLOAT_LAYER, Floors, Thresholds, load_thresholds
from evalsuite.quantize.base import QuantizedLinear
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


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """``10·log10(signal/noise)``; +inf when the noise is exactly zero."""
    if noise_power == 0.0:
        return math.inf if signal_power > 0 else math.nan
    if signal_power == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


# --- weight space --------------------------------------------------------------------------------


def integer_codes(mod: nn.Module) -> tuple[torch.Tensor, int, int] | None:
    """(codes [out, in], lowest code, highest code) of a known runtime module, else None."""
    from evalsuite.quantize.int4_wo import WeightOnlyInt4Linear, unpack_int4
    from evalsuite.quantize.int8_dq import Int8DynActInt8WeightLinear
    from evalsuite.quantize.int8_wo import WeightOnlyInt8Linear

    if isinstance(mod, WeightOnlyInt8Linear):
        return mod.weight, -128, 127
    if isinstance(mod, Int8DynActInt8WeightLinear):
        return mod.weight, -127, 127
    if isinstance(mod, WeightOnlyInt4Linear):
        return unpack_int4(mod.weight)[:, : mod.in_features], 0, 15
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and _plain(w) and w.dtype == torch.int8 and hasattr(mod, "scales"):
        return w, -128, 127  # gpt-fast's int8 layout, in a user's own module
    return None


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def dequantized_weight(mod: nn.Module, shape: torch.Size) -> tuple[torch.Tensor | None, str]:
    """(the weight ``mod``'s forward effectively uses, or None; how it was obtained or why not)."""
    deq = getattr(mod, "dequantize", None)
    if callable(deq):
        return deq(), f"{type(mod).__name__}.dequantize()"
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None, f"{type(mod).__name__} has no dequantize() and no weight tensor"
    if not _plain(w):
        deq = getattr(w, "dequantize", None)
        if callable(deq):
            try:
                return deq(), f"{type(w).__name__}.dequantize()"
            except Exception as e:  # noqa: BLE001 - a subclass that cannot dequantize: skip the view
                return None, f"{type(w).__name__}.dequantize() failed ({type(e).__name__})"
        return None, f"its weight is a {type(w).__name__} without dequantize()"
    if w.is_floating_point() and w.shape == shape:
        return w, "float weight"
    scales = getattr(mod, "scales", None)
    if w.dtype == torch.int8 and w.shape == shape and isinstance(scales, torch.Tensor) and scales.shape == shape[:1]:
        return w.float() * scales.float().unsqueeze(-1), "int8 weight x per-row scales (gpt-fast)"
    return None, (f"{type(mod).__name__} has no dequantize() and its {str(w.dtype).removeprefix('torch.')} weight "
                  f"{tuple(w.shape)} has no known layout")


CHUNK_ELEMENTS = 1 << 24  # float64 temporaries of at most 128 MiB, whatever the layer's size


def _row_chunks(n_rows: int, width: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    return (slice(lo, lo + step) for lo in range(0, n_rows, step))


@torch.no_grad()
def weight_errors(w: torch.Tensor, qmod: nn.Module, w_hat: torch.Tensor | None = None) -> dict[str, float]:
    """The weight-space metrics of one layer (see the module docstring), accumulated in float64 over
    row chunks so a large output head never needs a float64 copy of itself."""
    if w_hat is None:
        w_hat, how = dequantized_weight(qmod, w.shape)
        if w_hat is None:
            raise EvalsuiteError(f"cannot dequantize: {how}")
    if w_hat.shape != w.shape:
        raise EvalsuiteError(f"dequantized weight has shape {tuple(w_hat.shape)}, the fp weight {tuple(w.shape)}")
    signal = noise = max_abs = torch.zeros((), dtype=torch.float64, device=w.device)
    for rows in _row_chunks(w.shape[0], w.shape[1]):
        ref = w[rows].double()
        diff = ref - w_hat[rows].to(device=w.device, dtype=torch.float64)
        signal = signal + ref.square().sum()
        noise = noise + diff.square().sum()
        max_abs = torch.maximum(max_abs, diff.abs().max())
    signal, noise = float(signal), float(noise)
    out = {
        "weight_sqnr_db": sqnr_db(signal, noise),
        "weight_rel_error": math.sqrt(noise / signal) if signal > 0 else math.nan,
        "weight_max_abs_error": float(max_abs),
    }
    codes = integer_codes(qmod)
    if codes is not None:
        q, lo, hi = codes
        out["clipped_fraction"] = float(((q == lo) | (q == hi)).sum()) / q.numel()
    return out


# --- output space and hidden states: streaming accumulators ---------------------------------------


@dataclass
class PowerSums:
    """Σ‖ref‖², Σ‖ref − test‖², Σ per-token cosine and the token count, kept on the device in float64
    so that accumulating costs no host synchronisation."""

    signal: torch.Tensor | float = 0.0
    noise: torch.Tensor | float = 0.0
    cosine: torch.Tensor | float = 0.0
    tokens: int = 0

    def add(self, ref: torch.Tensor, test: torch.Tensor, with_cosine: bool = True) -> None:
        """Accumulate one batch (``[..., features]``), in float32 row chunks (a wide head's output
        would otherwise be copied whole)."""
        ref = ref.reshape(-1, ref.shape[-1])
        test = test.reshape(-1, test.shape[-1])
        for rows in _row_chunks(ref.shape[0], ref.shape[1]):
            r, t = ref[rows].float(), test[rows].float()
            # ‖·‖² by vector_norm accumulating in float64: ~3x faster on a CPU than square().sum(), no
            # squared copy, and closer to the float64 sum than it
            self.signal = self.signal + torch.linalg.vector_norm(r, dtype=torch.float64).square()
            self.noise = self.noise + torch.linalg.vector_norm(r - t, dtype=torch.float64).square()
            if with_cosine:
                self.cosine = self.cosine + F.cosine_similarity(r, t, dim=-1).sum(dtype=torch.float64)
        self.tokens += ref.shape[0]

    def values(self) -> tuple[float, float, float, int]:
        return float(self.signal), float(self.noise), float(self.cosine), self.tokens

    @staticmethod
    def merge(parts: list[tuple[float, float, float, int]]) -> tuple[float, float, float, int]:
        return tuple(sum(p[i] for p in parts) for i in range(4))  # type: ignore[return-value]


@dataclass
class Calibration:
    """Token batches [batch, seq_len] of the calibration text, and where they came from."""

    batches: list[torch.Tensor]
    source: str
    seq_len: int
    bos: bool = False  # each sequence starts with BOS (the tokenization rule's)

    @property
    def n_tokens(self) -> int:
        return sum(b.numel() for b in self.batches)


def calibration_batches(token_ids: list[int], n_tokens: int, seq_len: int, batch_tokens: int,
                        bos_id: int | None = None) -> list[torch.Tensor]:
    """Sequences of ``seq_len`` positions, ``n_tokens`` positions at most, grouped ``batch_tokens`` at a
    time: each is ``bos_id`` (where the run's tokenization rule puts BOS first, as the ppl stage's
    windows) then the next ``seq_len - 1`` tokens of the text, else ``seq_len`` tokens of the text."""
    body = seq_len - int(bos_id is not None)
    if body < 1:
        raise EvalsuiteError(f"a calibration sequence of {seq_len} tokens leaves no room for text after BOS")
    n_seq = min(n_tokens // seq_len, len(token_ids) // body)
    if n_seq == 0:
        raise EvalsuiteError(f"the calibration text has {len(token_ids)} tokens, fewer than one sequence of {seq_len}")
    ids = torch.tensor(token_ids[: n_seq * body], dtype=torch.long).view(n_seq, body)
    if bos_id is not None:
        ids = torch.cat([torch.full((n_seq, 1), bos_id, dtype=torch.long), ids], dim=1)
    per_batch = max(1, batch_tokens // seq_len)
    return list(ids.split(per_batch))


def calibration_tokens(tokenizer, text: str, n_tokens: int) -> list[int]:
    """Token ids of the start of ``text``, at least ``n_tokens`` of them where the text has that many;
    only a prefix is tokenized (the whole split takes seconds)."""
    chars = max(4096, n_tokens * 6)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > n_tokens or chars >= len(text):
            return ids
        chars *= 2


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → runtime module, for every quantized linear layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear) or
            (hasattr(m, "dequantize") and callable(m.dequantize) and type(m).__name__.endswith("Linear"))}


def _linear_like(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, QuantizedLinear)) or isinstance(getattr(mod, "weight", None), torch.Tensor) \
        or callable(getattr(mod, "dequantize", None))


def _changed(ref: nn.Linear, mod: nn.Module) -> bool:
    if type(mod) is not type(ref):
        return True
    w, rw = getattr(mod, "weight", None), ref.weight
    if not isinstance(w, torch.Tensor):
        return True
    if type(w) is not type(rw) or w.dtype != rw.dtype or w.shape != rw.shape or w.device != rw.device:
        return True
    return w is not rw and not torch.equal(w, rw)


def paired_layers(fp: nn.Module, variant: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → the variant's module, for every fp ``nn.Linear`` whose same-named module in
    ``variant`` is linear-like and changed (type, weight type/dtype/shape, or weight values)."""
    fp_linears = {name: m for name, m in fp.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for name, mod in variant.named_modules():
        ref = fp_linears.get(name)
        if ref is not None and _linear_like(mod) and _changed(ref, mod):
            out[name] = mod
    return out


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def measure_activations(
    fp: nn.Module,
    variants: dict[str, nn.Module],
    batches: list[torch.Tensor],
    device: torch.device,
    forward=None,
    progress=lambda it, **kw: it,
) -> tuple[dict[str, dict[str, PowerSums]], dict[str, list[PowerSums]]]:
    """Output-space sums per (variant, layer) and hidden-state sums per (variant, block).

    One fp pass per batch drives the layer hooks (each quantized layer runs on the fp layer's own
    input) and records the block outputs; then each quantized model runs the batch end to end and
    its block hooks compare against those records. Only one batch's block outputs are held.
    """
    from evalsuite.load.model import forward_logits, transformer_blocks
    from evalsuite.load.tp import full_output, local

    forward = forward or forward_logits
    layer_mods = {v: paired_layers(fp, m) for v, m in variants.items()}
    layer_sums = {v: {name: PowerSums() for name in mods} for v, mods in layer_mods.items()}
    fp_blocks = list(transformer_blocks(fp))
    block_sums = {v: [PowerSums() for _ in fp_blocks] for v in variants}
    names = sorted({n for mods in layer_mods.values() for n in mods})

    def layer_hook(name: str):
        def hook(module, args, output):
            # under --tp: the layer's local input, and column-parallel outputs gathered whole
            x, output = local(args[0]), full_output(module, output)
            for v, mods in layer_mods.items():
                if name in mods:
                    y = full_output(mods[name], mods[name](x))
                    if y.shape == output.shape:  # else (a module that does not map x alike) no output view
                        layer_sums[v][name].add(output, y)
        return hook

    fp_hidden: list[torch.Tensor | None] = [None] * len(fp_blocks)

    def record_hook(i: int):
        def hook(module, args, output):
            fp_hidden[i] = _first(output)
        return hook

    def compare_hook(v: str, i: int):
        def hook(module, args, output):
            block_sums[v][i].add(fp_hidden[i], _first(output), with_cosine=False)
        return hook

    handles = []
    try:
        for name in names:
            handles.append(fp.get_submodule(name).register_forward_hook(layer_hook(name)))
        for i, block in enumerate(fp_blocks):
            handles.append(block.register_forward_hook(record_hook(i)))
        for v, model in variants.items():
            for i, block in enumerate(transformer_blocks(model)):
                handles.append(block.register_forward_hook(compare_hook(v, i)))
        for batch in progress(batches, desc="layers", unit="batch"):
            batch = batch.to(device)
            forward(fp, batch)
            for model in variants.values():
                forward(model, batch)
            fp_hidden[:] = [None] * len(fp_blocks)
    finally:
        for h in handles:
            h.remove()
    return layer_sums, block_sums


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
