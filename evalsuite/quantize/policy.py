"""Which layers a scheme quantizes: an explicit, inspectable policy.

The seed quantizes every ``nn.Linear`` including the output head; here the head is excluded by
default (its error goes straight into the logits and it is often tied to the embeddings) and
``include_head=True`` puts it back.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from evalsuite.errors import EvalsuiteError


def output_head_name(model: nn.Module) -> str | None:
    """The qualified name of the module that produces the logits, or None if not found."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        head = getattr(model, "output", None)  # gpt-fast's Transformer
    if head is None:
        return None
    for name, mod in model.named_modules():
        if mod is head:
            return name
    return None


def parse_skip(spec: str | None) -> tuple[str, ...]:
    """``--skip-layers "a.*,b"`` → ("a.*", "b")."""
    return tuple(s.strip() for s in (spec or "").split(",") if s.strip())


@dataclass(frozen=True)
class LayerPolicy:
    """Selects the ``nn.Linear`` modules to quantize.

    include_head: also quantize the output head.
    skip: fnmatch patterns of qualified module names to leave in floating point; a pattern that
    matches no linear layer of the model is a usage error (a typo must not quantize everything).
    only: where given, the qualified names to quantize, of those the rest of the policy selects.
    """

    include_head: bool = False
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None  # exact names: a recipe gives each scheme's handler its own layers

    def select(self, model: nn.Module) -> list[str]:
        linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        unmatched = [pat for pat in self.skip if not any(fnmatch.fnmatchcase(n, pat) for n in linears)]
        if unmatched:
            raise EvalsuiteError(f"--skip-layers {','.join(unmatched)}: matches no linear layer of the model "
                                 f"(its {len(linears)} are named like {', '.join(linears[:3]) or 'nothing'}); "
                                 "fnmatch patterns of qualified names, e.g. 'model.layers.0.*'")
        head = output_head_name(model)
        names = []
        for name in linears:
            if name == head and not self.include_head:
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in self.skip):
                continue
            if self.only is not None and name not in self.only:
                continue
            names.append(name)
        return names
