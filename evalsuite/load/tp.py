"""Tensor-parallel evaluation (``--tp N``) on PyTorch's own stack: torchrun, a 2-D device mesh and
``torch.distributed.tensor.parallel.parallelize_module``.

Under ``torchrun --nproc-per-node W``, ranks form a (W/N data-parallel replicas) x (N tensor-parallel
ranks) mesh; the N ranks of a replica sit next to each other (one host, NVLink). In every decoder
block the attention q/k/v and the MLP gate/up projections are column-parallel (each rank holds a
slice of the output features: a slice of the heads, of the MLP width) and o/down are row-parallel
(each rank multiplies its slice of the input features; one all-reduce sums them), as gpt-fast's
``tp.py`` does. Hugging Face Llama-family attention reshapes with ``-1`` heads, so it runs on its
local heads unchanged. Embedding, norms and the output head stay replicated: every TP rank computes
the full-vocabulary logits (simple and exact; a vocab-sharded head is not done yet).

Float ``nn.Linear`` layers become DTensor ``ColwiseParallel``/``RowwiseParallel``. Quantized runtime
modules, which DTensor has no ops for, keep their slice as plain tensors (:class:`LocalShard`):
column-parallel slices weight rows with their per-row scales/zeros/bias, row-parallel slices weight
columns (int4: whole groups, with their scales and zeros) and keeps per-row scales whole. Every such
sharded layer is checked once against its unsharded output; one that does not reproduce it (a user's
module that is not linear-like) is refused in one line. The stages see data-parallel rank and size
only (``RunContext.rank``/``world_size``): the TP ranks of a replica take the same work units.
"""

from __future__ import annotations

import copy
import functools
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from evalsuite.errors import EvalsuiteError

COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")
# stages whose forwards are not sharded yet (KV-cache decoding, timed decoding)
UNSHARDED_STAGES = ("gen", "speed")


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the (dp, tp) mesh; ``Layout()`` for a run without --tp."""

    tp: int = 1
    dp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    mesh: Any = None  # the 2-D DeviceMesh ("dp", "tp"), None without --tp

    @property
    def tp_mesh(self):
        return None if self.mesh is None else self.mesh["tp"]


def validate(tp: int, world_size: int, configs: list, stages: list[str], stages_arg: str) -> list[str]:
    """The cheap checks before anything loads; returns the stages to run (``--stages all`` drops the
    ones not sharded yet, with a note; naming one is refused)."""
    if tp < 1:
        raise EvalsuiteError(f"--tp {tp}: must be at least 1")
    if tp == 1:
        return stages
    if world_size == 1:
        raise EvalsuiteError(f"--tp {tp} needs {tp} processes: launch with torchrun --nproc-per-node {tp} "
                             f"(or a multiple of {tp}) -m evalsuite run ...")
    if world_size % tp:
        raise EvalsuiteError(f"--tp {tp} does not divide the {world_size} torchrun processes; "
                             f"--nproc-per-node must be a multiple of {tp}")
    from evalsuite.quantize.fp8_dq import Float8DynamicActivationFloat8WeightConfig
    from evalsuite.quantize.int8_dq import Int8DynamicActivationInt8WeightConfig
    from evalsuite.quantize.torchao_config import TorchaoConfig

    for cfg in configs:
        if isinstance(cfg, (Int8DynamicActivationInt8WeightConfig, Float8DynamicActivationFloat8WeightConfig)):
            # its per-token activation scale would be taken over a row-parallel rank's slice only
            raise EvalsuiteError(f"--tp {tp}: scheme {cfg.name} (dynamic activation quantization) cannot be "
                                 "sharded exactly; run it without --tp")
        if isinstance(cfg, TorchaoConfig):
            raise EvalsuiteError(f"--tp {tp}: torchao tensor subclasses ({cfg.name}) are not sharded yet; "
                                 "run them without --tp")
    named = [s for s in stages if s in UNSHARDED_STAGES]
    if named and stages_arg.strip().lower() != "all":
        raise EvalsuiteError(f"--tp {tp}: stage {', '.join(named)} does not run tensor-parallel yet; "
                             "drop it from --stages")
    return [s for s in stages if s not in UNSHARDED_STAGES]


def init_mesh(device_type: str, world_size: int, tp: int) -> Layout:
    """The (dp, tp) device mesh over torchrun's process group; gathers of the stages then run over
    the data-parallel dimension only."""
    from torch.distributed.device_mesh import init_device_mesh

    from evalsuite import distributed

    mesh = init_device_mesh(device_type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    distributed.set_data_group(mesh["dp"].get_group() if world_size > tp else None)
    return Layout(tp=tp, dp=world_size // tp, tp_rank=mesh["tp"].get_local_rank(),
                  dp_rank=mesh["dp"].get_local_rank(), mesh=mesh)


def check_shape(model: nn.Module, tp: int) -> None:
    """Heads, KV heads and the MLP width must split evenly over ``tp`` ranks."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_attention_heads"):
        raise EvalsuiteError(f"--tp {tp}: only Hugging Face Llama-family models (q/k/v/o and gate/up/down "
                             f"projections) are sharded; {type(model).__name__} is not one")
    sizes = {"attention heads": cfg.num_attention_heads,
             "KV heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
             "MLP width": getattr(cfg, "intermediate_size", 0)}
    bad = [f"{n} {v}" for n, v in sizes.items() if v % tp]
    if bad:
        raise EvalsuiteError(f"--tp {tp} does not divide the model's {', '.join(bad)}; pick a --tp that does")


GROUPS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))


def sharding_plan(model: nn.Module) -> dict[str, str]:
    """Qualified name → "col" or "row" for every projection that is sharded. An attention or MLP
    block is sharded whole or not at all: a fused ``qkv_proj`` beside a row-parallel ``o_proj``
    would feed it whole inputs, so a block with only part of its projections is refused."""
    children: dict[str, set[str]] = {}
    for name, _ in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if parent and leaf in COLWISE + ROWWISE:
            children.setdefault(parent, set()).add(leaf)
    plan = {}
    for parent, leaves in children.items():
        group = next(g for g in GROUPS if leaves & set(g))
        if leaves != set(group):
            raise EvalsuiteError(f"--tp: {parent} has {', '.join(sorted(leaves))} but not "
                                 f"{', '.join(sorted(set(group) - leaves))}; only blocks with all of "
                                 f"{'/'.join(group)} are sharded")
        plan.update({f"{parent}.{leaf}": "col" if leaf in COLWISE else "row" for leaf in group})
    if not plan:
        raise EvalsuiteError(f"--tp: {type(model).__name__} has no q/k/v/o or gate/up/down projections to shard")
    return plan


# --- quantized modules: plain-tensor slices ---------------------------------------------------------


def _tensor_dims(mod: nn.Module, kind: str, tp: int) -> dict[str, int] | None:
    """Which of ``mod``'s tensors are sliced along which dim, or None when its layout is unknown."""

    from evalsuite.quantize.int4_wo import WeightOnlyInt4Linear

    tensors = dict(mod.named_parameters(recurse=False)) | dict(mod.named_buffers(recurse=False))
    w = tensors.get("weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or list(mod.children()):
        return None
    out_features = w.shape[0]
    if isinstance(mod, WeightOnlyInt4Linear):
        if kind == "col":
            return {n: 0 for n in tensors}
        if mod.in_features % (tp * mod.group_size):  # a group must not straddle two ranks
            return None
        return {"weight": 1, "scales": 1, "zeros": 1}
    allowed = {"weight", "scales", "bias"}  # the gpt-fast int8 layout, or a float weight
    if set(tensors) - allowed:
        return None
    for n in ("scales", "bias"):
        if tensors.get(n) is not None and tuple(tensors[n].shape) != (out_features,):
            return None
    if kind == "col":
        return {n: 0 for n in tensors}
    return {"weight": 1}


@functools.cache
def local_shard_style() -> type:
    """The :class:`LocalShard` class, built on first use: torch.distributed.tensor costs ~0.5 s to
    import, which a run without --tp should not pay."""
    from torch.distributed.tensor.parallel.style import ParallelStyle

    class LocalShard(ParallelStyle):
        """A ``ParallelStyle`` for quantized modules: slices the tensors in place (plain tensors, no
        DTensor) and, row-parallel, all-reduces the partial outputs over the TP group. The bias of a
        row-parallel layer stays on TP rank 0 only (zeros elsewhere), so the sum adds it once."""

        def __init__(self, kind: str):
            super().__init__()
            self.kind = kind

        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            rank, n = device_mesh.get_local_rank(), device_mesh.size()
            dims = _tensor_dims(module, self.kind, n)
            if dims is None:
                raise EvalsuiteError(f"{type(module).__name__} is not linear-like (a [out, in] weight with per-row "
                                     "scales and bias, or an int4 layout whose groups split evenly over the ranks)")
            for name, dim in dims.items():
                piece = getattr(module, name).chunk(n, dim=dim)[rank].contiguous().clone()
                if name in module._parameters:
                    module._parameters[name] = nn.Parameter(piece, requires_grad=False)
                else:
                    module._buffers[name] = piece
            if self.kind == "row":
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor) and rank:
                    bias.zero_()
                group = device_mesh.get_group()
                module.register_forward_hook(lambda mod, args, out: _all_reduce(out, group))
            for attr, kind in (("out_features", "col"), ("in_features", "row")):
                if self.kind == kind and isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, getattr(module, attr) // n)
            module._evalsuite_tp = (self.kind, dims, device_mesh)
            return module

    return LocalShard


def _dtensor_type() -> type | None:
    """DTensor's class where torch.distributed.tensor is loaded, else None: no DTensor can exist
    before it is, so a run without --tp never imports it to check."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _all_reduce(out: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(out, group=group)
    return out


# --- the model ---------------------------------------------------------------------------------------


def shard(model: nn.Module, layout: Layout, device: torch.device, variant: str = "fp") -> nn.Module:
    """Shard ``model`` (a full copy on every rank, e.g. on the CPU) over the layout's TP ranks and
    move it to ``device``; refuses, on every rank alike, a layer whose slices do not reproduce it."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_shape(model, layout.tp)
    plan = sharding_plan(model)
    reference = {name: model.get_submodule(name) for name, kind in plan.items()
                 if type(model.get_submodule(name)) is not nn.Linear}
    probes = _probe_outputs(model.config, reference)
    styles = {}
    for name, kind in plan.items():
        mod = model.get_submodule(name)
        if type(mod) is nn.Linear:
            style = ColwiseParallel() if kind == "col" else RowwiseParallel()
            style.src_data_rank = None  # every rank holds the full weight: slice locally, no scatter
        else:
            style = local_shard_style()(kind)
        styles[name] = style
    try:
        parallelize_module(model, layout.tp_mesh, styles)
    except EvalsuiteError as e:
        raise EvalsuiteError(f"--tp {layout.tp}: cannot shard variant {variant}: {e}") from None
    for name, kind in plan.items():
        mod = model.get_submodule(name)
        if type(mod) is nn.Linear:
            mod._evalsuite_tp = (kind, None, layout.tp_mesh)
    model.to(device)
    bad = _check_probes(model, probes, layout)
    if bad:
        raise EvalsuiteError(f"--tp {layout.tp}: variant {variant}: sharded {bad[0]} does not reproduce its "
                             f"unsharded output ({len(bad)} layers); its module is not linear-like, run it without --tp")
    return model


def _input_width(cfg, name: str) -> int:
    """The input features of a projection, from the model's config (a user's module may not say)."""
    leaf = name.rpartition(".")[2]
    if leaf == "o_proj":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cfg.num_attention_heads * head_dim
    return cfg.intermediate_size if leaf == "down_proj" else cfg.hidden_size


def _probe_outputs(cfg, mods: dict[str, nn.Module]) -> dict[str, tuple]:
    """One random row through each unsharded quantized layer (the same row on every rank); a layer
    whose own forward fails on it maps to None (refused)."""
    gen = torch.Generator().manual_seed(0)
    probes: dict[str, tuple | None] = {}
    with torch.no_grad():
        for name, mod in mods.items():
            device = _device_of(mod)
            x = torch.randn(1, _input_width(cfg, name), generator=gen).to(dtype=_float_dtype(mod), device=device)
            try:
                probes[name] = (x, mod(x).detach().clone())
            except Exception:  # noqa: BLE001 - a user's module that does not map [.., in] to [.., out]
                probes[name] = None
    return probes


def _device_of(mod: nn.Module) -> torch.device:
    return next(iter(list(mod.buffers()) + list(mod.parameters())), torch.empty(0)).device


def _float_dtype(mod: nn.Module) -> torch.dtype:

    for t in list(mod.buffers()) + list(mod.parameters()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _check_probes(model: nn.Module, probes: dict[str, tuple], layout: Layout) -> list[str]:
    import torch.distributed as dist

    bad = []
    with torch.no_grad():
        for name, probe in probes.items():
            if probe is None:
                bad.append(name)
                continue
            x, want = probe
            mod = model.get_submodule(name)
            kind = mod._evalsuite_tp[0]
            rank, n = layout.tp_rank, layout.tp
            device = _device_of(mod)
            x, want = x.to(device), want.to(device)
            if kind == "col":
                want = want.chunk(n, dim=-1)[rank]
            try:
                got = mod(x.chunk(n, dim=-1)[rank].contiguous() if kind == "row" else x)
            except Exception:  # noqa: BLE001 - a user's forward that cannot run on its slices: refused
                bad.append(name)
                continue
            tol = 1e-4 if want.dtype == torch.float32 else 3e-2
            scale = float(want.float().abs().max().clamp(min=1e-30))
            if got.shape != want.shape or float((got.float() - want.float()).abs().max()) > tol * scale:
                bad.append(name)
    parts: list[Any] = [None] * layout.tp
    dist.all_gather_object(parts, bad, group=layout.tp_mesh.get_group())
    return sorted({b for p in parts for b in p})


# --- full views for the layers stage -----------------------------------------------------------------


def local(t: Any) -> Any:
    """A DTensor's local part (the input a sharded layer's hook sees), anything else unchanged."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def full_output(mod: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A column-parallel layer's output gathered to all its features; other outputs unchanged."""
    spec = getattr(mod, "_evalsuite_tp", None)
    out = local(out)
    if spec is None or spec[0] != "col":
        return out
    return _all_gather(out, -1, spec[2])


def _all_gather(t: torch.Tensor, dim: int, mesh) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(mesh.size())]
    dist.all_gather(parts, t.contiguous(), group=mesh.get_group())
    return torch.cat(parts, dim=dim)


def full_weight(mod: nn.Module) -> torch.Tensor:
    """The whole weight of a (possibly DTensor-sharded) float layer."""
    dtensor, w = _dtensor_type(), mod.weight
    return w.full_tensor() if dtensor is not None and isinstance(w, dtensor) else w


def unsharded(mod: nn.Module) -> nn.Module:
    """A whole copy of a :class:`LocalShard` layer (its slices gathered from the TP ranks), so weight
    metrics are computed exactly as on one process; any other module is returned as it is."""
    spec = getattr(mod, "_evalsuite_tp", None)
    if spec is None:
        return mod
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    kind, dims, mesh = spec
    whole = copy.copy(mod)
    whole._buffers, whole._parameters = dict(mod._buffers), dict(mod._parameters)
    whole._forward_hooks, whole._forward_pre_hooks = type(mod._forward_hooks)(), type(mod._forward_pre_hooks)()
    del whole._evalsuite_tp
    if dims is None:  # a DTensor-sharded float layer
        for name, t in mod._parameters.items():
            if isinstance(t, DTensor):
                whole._parameters[name] = nn.Parameter(t.full_tensor(), requires_grad=False)
        return whole
    for name, dim in dims.items():
        t = getattr(mod, name)
        if t is None:
            continue
        gathered = _all_gather(t, dim, mesh)
        (whole._parameters if name in mod._parameters else whole._buffers)[name] = gathered
    bias = getattr(mod, "bias", None)
    if kind == "row" and bias is not None:
        bias = bias.detach().clone()
        dist.all_reduce(bias, group=mesh.get_group())  # rank 0's bias plus zeros
        (whole._parameters if "bias" in mod._parameters else whole._buffers)["bias"] = bias
    for attr, k in (("out_features", "col"), ("in_features", "row")):
        if kind == k and isinstance(getattr(mod, attr, None), int):
            setattr(whole, attr, getattr(mod, attr) * mesh.size())
    return whole
