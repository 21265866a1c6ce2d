"""What every measure stage receives: the models, the run's settings, and the results to append to."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from evalsuite.errors import EvalsuiteError
from evalsuite.load import LoadedModel
from evalsuite.results import Results


@contextlib.contextmanager
def progress_bars_off():
    """Every tqdm progress bar off inside the block (``--no-progress``, or stderr not a terminal), the
    libraries' included: lm-eval's request building, datasets', huggingface_hub's and transformers'.
    ``TQDM_DISABLE`` alone does not do it: tqdm reads its environment once, when it is imported
    (``import torch`` imports it), and an explicit ``disable=False`` wins over it anyway; so
    ``tqdm.std.tqdm.__init__`` (which every tqdm class ends in) is made to disable each bar, and
    restored after."""
    from tqdm import std

    os.environ["TQDM_DISABLE"] = "1"  # a tqdm imported later in a subprocess reads it
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    original = std.tqdm.__init__

    @functools.wraps(original)
    def disabled(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        std.tqdm.__init__ = original


@dataclass
class RunContext:
    """A stage reads ``variants`` (``"fp"`` first, then each scheme, all on ``device`` in ``dtype``),
    appends records to ``results`` and per-item data to ``results.details[stage]``.

    ``reload(dtype)`` gives a fresh fp model in another dtype (the KL noise floor needs fp32);
    ``checkpoint()`` saves what has been computed so far, so a later failure loses nothing.
    In a distributed run ``rank``/``world_size`` say which shard of the work units is this process's
    (under ``--tp`` the data-parallel replica: its ``tp_rank``s take the same units, models sharded).
    """

    loaded: LoadedModel
    variants: dict[str, nn.Module]
    configs: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    config: Any  # the run's configuration (evalsuite.app.config.RunConfig): read through option()
    results: Results
    data_dir: Path | None = None
    limit: int | None = None
    reload: Callable[[torch.dtype], nn.Module] | None = None
    checkpoint: Callable[[], None] = lambda: None
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    show_progress: bool = field(default_factory=lambda: sys.stderr.isatty())

    @property
    def is_writer(self) -> bool:
        """One process of the run prints and writes shared files (caches, tables)."""
        return self.rank == 0 and self.tp_rank == 0

    @property
    def tokenizer(self):
        if self.loaded.tokenizer is None:
            raise EvalsuiteError(f"{self.loaded.info.path}: this model has no tokenizer; pass --tokenizer PATH")
        return self.loaded.tokenizer

    @property
    def fp(self) -> nn.Module:
        return self.variants["fp"]

    @property
    def quantized(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.variants.items() if k != "fp"}

    def progress(self, iterable: Iterable, desc: str, total: int | None = None, unit: str = "it"):
        """A progress bar on stderr for anything that takes more than a few seconds."""
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not self.show_progress or not self.is_writer,
                    leave=False, mininterval=1.0)

    @property
    def skip(self) -> tuple[str, ...]:
        """``--skip-layers`` patterns: linear layers the run kept in floating point."""
        from evalsuite.quantize.policy import parse_skip

        return parse_skip(self.option("skip_layers"))

    @property
    def fused_kernels(self) -> bool:
        """``--kernels fused`` (the default): Triton kernels where they apply (CUDA, Llama-family
        forwards, the ppl statistics); ``eager``: PyTorch's own ops throughout, for cross-checks."""
        return self.option("kernels", "fused") == "fused"

    def fused_forwards(self, *models: nn.Module | None) -> contextlib.AbstractContextManager[int]:
        """:func:`evalsuite.load.fast_forward.fast_forward_all` over every given model (None
        skipped), unless ``--kernels eager``; yields how many modules run fused."""
        from evalsuite.load.fast_forward import fast_forward_all

        return fast_forward_all(*models, enabled=self.fused_kernels)

    def option(self, name: str, default: Any = None) -> Any:
        """A stage option (``--ppl-context`` as ``ppl_context``) or run setting of the run's config."""
        return self.config.option(name, default)
