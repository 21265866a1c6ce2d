"""``--variant-model NAME=PATH``: a model quantized elsewhere, judged as a variant of ``--model``.

PATH is anything ``load_model`` reads: a Hugging Face folder (including GPTQ/AWQ/compressed-tensors
folders that transformers loads), a ``.gguf`` of another quant type (dequantized to float by
transformers), a gpt-fast ``.pth`` (int8 when it holds ``.scales``; ``--arch`` as for ``--model``).
It must speak the reference's vocabulary: a different tokenizer makes every paired statistic
meaningless, so it is refused; so is the reference itself (the same path, or the same weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evalsuite.errors import EvalsuiteError
from evalsuite.load.model import LoadedModel, detect_format, load_model
from evalsuite.quantize.spec import check_name


@dataclass(frozen=True)
class VariantModelSpec:
    name: str
    path: Path
    format: str

    @property
    def spec(self) -> str:
        return f"{self.name}={self.path}"


def parse_variant_models(specs: list[str] | None, taken: set[str],
                         reference: Path | None = None) -> list[VariantModelSpec]:
    """Validate every ``NAME=PATH`` before anything loads; names must not clash with ``taken``, and
    PATH must not be ``reference`` (the ``--model`` itself; the same weights elsewhere are refused once
    loaded, by their sha256)."""
    out: list[VariantModelSpec] = []
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise EvalsuiteError(f"--variant-model {spec!r}: expected NAME=PATH")
        check_name(name, f"--variant-model {spec}")
        if name in taken or any(v.name == name for v in out):
            raise EvalsuiteError(f"--variant-model {spec!r}: variant name {name!r} is already taken")
        p = Path(path)
        try:
            fmt = detect_format(p)
        except EvalsuiteError as e:
            raise EvalsuiteError(f"--variant-model {name}: {e}") from None
        if reference is not None and p.resolve() == Path(reference).resolve():
            raise EvalsuiteError(f"--variant-model {spec}: is --model itself; a model compared with itself proves "
                                 "nothing")
        out.append(VariantModelSpec(name, p, fmt))
    return out


def vocabulary_difference(reference: LoadedModel, variant: LoadedModel) -> str | None:
    """Why ``variant`` does not share the reference's vocabulary, or None when it does."""
    if variant.info.vocab_size != reference.info.vocab_size:
        return f"a vocabulary of {variant.info.vocab_size} tokens, the reference {reference.info.vocab_size}"
    if reference.tokenizer is None or variant.tokenizer is None:
        return None  # the sizes agree and there is nothing else to compare
    ref_vocab, var_vocab = reference.tokenizer.get_vocab(), variant.tokenizer.get_vocab()
    if ref_vocab != var_vocab:
        differ = sorted(set(ref_vocab.items()) ^ set(var_vocab.items()), key=lambda kv: kv[1])
        example = differ[0][0] if differ else "?"
        return f"a different tokenizer ({len(differ) // 2 or len(differ)} token ids differ, e.g. {example!r})"
    return None


def load_variant_model(spec: VariantModelSpec, reference: LoadedModel, device: torch.device, dtype: torch.dtype,
                       arch: str | None = None) -> LoadedModel:
    try:
        loaded = load_model(spec.path, device=device, dtype=dtype, arch=arch)
    except EvalsuiteError as e:
        raise EvalsuiteError(f"--variant-model {spec.name}: {e}") from None
    why = vocabulary_difference(reference, loaded)
    if why is not None:
        raise EvalsuiteError(f"--variant-model {spec.name}={spec.path}: it has {why}; a comparison with "
                             f"{reference.info.name} would be meaningless")
    return loaded
