"""Per-layer error capture for the ``layers`` stage (:mod:`evalsuite.measure.layers`, whose
docstring defines every metric): weight-space errors of a quantized layer against its fp weight,
the forward hooks that accumulate output-space and hidden-state power sums on calibration text, the
calibration batches, and which layers of a variant count as quantized (paired with the fp model's).

What the numbers mean for a verdict (floors, ranking, the records) stays in the stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.errors import EvalsuiteError
from evalsuite.quantize.base import QuantizedLinear


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
