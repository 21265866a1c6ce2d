"""A GGUF file's weights read straight onto the device and dequantized there.

transformers' own GGUF loader dequantizes every tensor in numpy on the host, copies it, and maps tensor
names with one gguf-py name table per submodule (about 20 s for SmolLM2-135M's 98 MB on one CPU core).
Here the file is memory-mapped once (``gguf.GGUFReader``, :func:`open_reader`), each tensor's raw
blocks go to the device as they are, and the common block
types (F32, F16, BF16, Q8_0, Q4_0, Q4_1) are unpacked there with torch ops that compute exactly what
``gguf.quants.dequantize`` computes (the same float32 products and sums, no fused multiply-add), so the
weights equal transformers' bit for bit (a NaN's payload aside). Other types gguf-py knows are dequantized on the host by
``gguf.quants.dequantize``, with one line saying which. Config and tokenizer still come from
transformers, so they are its own, from one parse of the file instead of three (:func:`parsed_once`).

What this does not know how to match exactly (an architecture other than llama, a tensor type gguf-py
cannot dequantize, a model tensor the file lacks) raises ``NotStreamable``; the caller then loads the
file through transformers, with one line saying why.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ARCHITECTURES = ("llama",)  # GGUF general.architecture values whose tensor layout is mapped here


class NotStreamable(Exception):
    """The file is one this reader does not reproduce transformers' load of exactly."""


@dataclass
class StreamedGGUF:
    model: nn.Module  # float32, on the device, eval mode
    tokenizer: Any
    seconds: dict[str, float] = field(default_factory=dict)  # read, config, tokenizer, dequant, build
    host_types: dict[str, int] = field(default_factory=dict)  # tensor type → tensors dequantized on the host


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types and f.types[0].name == "STRING" else value[0].item()


def _f16(blocks: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th float16 of each block (blocks of an even byte size), as a [n_blocks, 1] float32
    column."""
    return blocks.view(torch.float16)[:, index:index + 1].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """A block's 4-bit values in ggml's order: the low nibbles of its bytes, then the high ones."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=1).reshape(qs.shape[0], -1)


def _scaled(values: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``float32(values) * d`` in one float32 allocation (in-place ops: the same products, without
    the temporaries that cost a host run its page faults)."""
    return torch.empty(values.shape, dtype=torch.float32, device=values.device).copy_(values).mul_(d)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _scaled(b[:, 2:].view(torch.int8), _f16(b, 0))


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _scaled(_nibbles(b[:, 2:]).view(torch.int8) - 8, _f16(b, 0))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _scaled(_nibbles(b[:, 4:]), _f16(b, 0)).add_(_f16(b, 1))


def _floats(torch_dtype: torch.dtype):
    return lambda raw: raw.view(torch_dtype).to(torch.float32, copy=True)  # never the file's own memory


def device_dequantizers() -> dict:
    """GGML type → (unpack raw bytes on the device to float32 values in order, block size)."""
    from gguf import GGMLQuantizationType as Q

    return {Q.F32: (_floats(torch.float32), 1), Q.F16: (_floats(torch.float16), 1),
            Q.BF16: (_floats(torch.bfloat16), 1), Q.Q8_0: (_q8_0, 32), Q.Q4_0: (_q4_0, 32), Q.Q4_1: (_q4_1, 32)}


def reverse_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved → half-split rotary), as transformers'
    ``LlamaTensorProcessor._reverse_permute_weights`` does: an exact reordering of rows."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def host_dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """gguf-py's numpy dequantization (what transformers' loader uses for every tensor); raises
    NotImplementedError for a type it does not know."""
    from gguf.quants import dequantize

    return dequantize(data, qtype)


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    return no_init_weights()


def _hf_names(model: nn.Module, arch_name: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name → the model's state-dict name, as transformers' ``get_gguf_hf_weights_map``
    maps them for a llama (one name map, not one per submodule: that is 5 s of its load)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch_name), None)
    if arch is None:
        raise NotStreamable(f"gguf-py has no tensor names for architecture {arch_name!r}")
    name_map = get_tensor_name_map(arch, n_layers)
    out: dict[str, str] = {}
    for hf_name in model.state_dict():
        stem, suffix = hf_name.rsplit(".", 1) if hf_name.endswith((".weight", ".bias")) else (hf_name, "")
        gguf_name = name_map.get_name(stem)
        if gguf_name is not None:
            out.setdefault(gguf_name + ("." + suffix if suffix else ""), hf_name)
    return out


def open_reader(path: Path):
    """gguf-py's ``GGUFReader`` of ``path`` over a plain ndarray view of its memory map rather than the
    ``np.memmap`` itself: the same bytes, fields and tensors (zero-copy, read-only), parsed ~3x faster
    (4.8 s → 1.5 s for SmolLM2's header on one core): every slice of a memmap subclass runs its
    ``__array_finalize__``, and the header is sliced a few times per vocabulary string."""
    from gguf import GGUFReader

    class PlainReader(GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)

    return PlainReader(path)


@contextlib.contextmanager
def parsed_once(path: Path, reader):
    """transformers' GGUF config and tokenizer loads each parse the whole file again
    (``load_gguf_checkpoint``: a ``gguf.GGUFReader`` over every metadata field, the vocabulary's and
    merges' ~100k strings one numpy view at a time, ~5 s for SmolLM2 on one core, twice or three
    times). Within this block, ``gguf.GGUFReader`` of ``path`` is ``reader`` (made already, read-only),
    and ``load_gguf_checkpoint(path, return_tensors=False)`` runs once, each caller getting a deep copy
    of its result: the same functions on the same bytes, so config and tokenizer are transformers' own.
    Every other call (another file, tensors asked for) goes to the originals; everything is put back
    on leaving, in the modules that imported the function meanwhile too."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original_reader, original_load = gguf.GGUFReader, gguf_utils.load_gguf_checkpoint
    target = os.path.realpath(path)
    result: dict[str, Any] = {}

    def reader_of(file, *args, **kwargs):
        if not args and not kwargs and os.path.realpath(file) == target:
            return reader
        return original_reader(file, *args, **kwargs)

    def load_once(file, return_tensors=False, model_to_load=None, **kwargs):
        if return_tensors or model_to_load is not None or kwargs or os.path.realpath(file) != target:
            return original_load(file, return_tensors=return_tensors, model_to_load=model_to_load, **kwargs)
        if "metadata" not in result:
            result["metadata"] = original_load(file, return_tensors=False)
        return copy.deepcopy(result["metadata"])

    def swap(old, new) -> None:  # the name as each transformers module holds it (imported or not yet)
        for module in list(sys.modules.values()):
            names = getattr(module, "__dict__", {})
            if getattr(module, "__name__", "").startswith("transformers") and names.get("load_gguf_checkpoint") is old:
                setattr(module, "load_gguf_checkpoint", new)

    gguf.GGUFReader = reader_of
    swap(original_load, load_once)
    try:
        yield
    finally:
        gguf.GGUFReader = original_reader
        swap(load_once, original_load)


def load_streamed(path: Path, device: torch.device, load_tokenizer) -> StreamedGGUF:
    """The GGUF at ``path`` as a float32 transformers model on ``device`` (weights dequantized there)
    and its tokenizer (``load_tokenizer(path)``); raises ``NotStreamable`` for what it cannot match."""
    from gguf.quants import quant_shape_from_byte_shape
    from transformers import AutoConfig, AutoModelForCausalLM

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    reader = open_reader(path)
    arch_name = _field(reader, "general.architecture")
    seconds["read"] = round(time.perf_counter() - t, 3)
    if arch_name not in ARCHITECTURES:
        raise NotStreamable(f"architecture {arch_name!r} is not read by the streaming loader")
    if _field(reader, f"{arch_name}.attention.head_count") is None or \
            _field(reader, f"{arch_name}.attention.head_count_kv") is None:
        # transformers leaves q/k unpermuted when either count is missing: not reproduced here
        raise NotStreamable("the file does not give both attention head counts")
    unpackers = device_dequantizers()

    with parsed_once(path, reader):
        t = time.perf_counter()
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        seconds["config"] = round(time.perf_counter() - t, 3)
        if config.model_type != arch_name:  # a llama-architecture file that transformers reads as mistral
            raise NotStreamable(f"transformers reads it as {config.model_type!r}, not {arch_name!r}")
        t = time.perf_counter()
        tokenizer = load_tokenizer(path)
        seconds["tokenizer"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = _hf_names(model, arch_name, config.num_hidden_layers)
    seconds["build"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    state: dict[str, torch.Tensor] = {}
    host_types: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for tensor in reader.tensors:
            hf_name = names.get(tensor.name)
            if hf_name is None:  # transformers skips what the model has no place for (rope_freqs)
                continue
            qtype = tensor.tensor_type
            if qtype in unpackers:
                unpack, block = unpackers[qtype]
                shape = quant_shape_from_byte_shape(tensor.data.shape, qtype) if block > 1 else tensor.data.shape
                raw = torch.from_numpy(tensor.data.reshape(-1).view(np.uint8)).to(device)
                values = unpack(raw.view(-1, raw.numel() * block // int(np.prod(shape))) if block > 1 else raw)
                values = values.reshape(shape)
            else:
                try:
                    values = torch.from_numpy(np.ascontiguousarray(host_dequantize(tensor.data, qtype), np.float32))
                except NotImplementedError:
                    raise NotStreamable(f"tensor type {qtype.name} cannot be dequantized by gguf-py") from None
                values = values.to(device)
                host_types[qtype.name] = host_types.get(qtype.name, 0) + 1
            if ".attn_q." in tensor.name:
                values = reverse_permute(values, config.num_attention_heads)
            elif ".attn_k." in tensor.name:
                values = reverse_permute(values, config.num_key_value_heads)
            state[hf_name] = values
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds["dequant"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    expected = set(model.state_dict())
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = expected - set(state) - tied
    if missing:
        raise NotStreamable(f"the file lacks {len(missing)} tensor(s) the model needs ({sorted(missing)[0]}, ...)")
    for hf_name, values in state.items():
        if tuple(values.shape) != tuple(model.get_parameter(hf_name).shape):
            raise NotStreamable(f"tensor {hf_name} has shape {tuple(values.shape)}, the config says otherwise")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model = model.to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds["build"] = round(seconds["build"] + time.perf_counter() - t, 3)
    return StreamedGGUF(model=model, tokenizer=tokenizer, seconds=seconds, host_types=host_types)
