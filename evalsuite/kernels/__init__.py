"""Every GPU kernel of the suite, in one place (Triton). The stages call these through their own
modules (``load.fast_forward``, ``measure.perplexity``, ``quantize.fast_int8``); nothing here
imports a stage.

- ``llama_fused``: RMSNorm, rotary and SwiGLU for the fused Llama forwards;
- ``kld``: the ppl stage's one-pass per-token statistics (KL, NLL, Δp, same top-1);
- ``int8_gemv``: the speed stage's batch-1 int8 weight-only GEMV and its variants.

Each module imports without Triton (CPU-only installs) and then offers nothing that launches.
"""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # CPU-only installs have no Triton
    HAVE_TRITON = False

# read once: Triton decides at import whether kernels are interpreted, and a constant keeps the
# guards free of environment lookups inside torch.compile'd code
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
