"""Downstream tasks through lm-eval: fp and every quantized variant answer the same items.

Tasks are lm-eval YAML definitions in the project's ``tasks/`` folder (plus any ``--tasks-dir``);
they read the local mirror when ``--data-dir`` is given and the Hub otherwise. lm-eval builds the
requests and scores each item (``process_results``); the models are run by ``TorchLM`` (or by
lm-eval's own ``HFLM`` with ``--lm-adapter hf``) with no request cache, so no variant can read
another's answers. Statistics are ours, from the per-item values:

- per variant: every metric of the task; ``mean``-aggregated ones (``acc``, ``acc_norm``) with the
  standard error of the mean; LAMBADA's ``perplexity`` is recorded as ``ppl`` with a bootstrap ci95.
- paired (variant = scheme, against fp on the same items): ``delta_acc`` = acc(scheme) - acc(fp)
  with a paired-bootstrap 95% interval, ``mcnemar_p`` (exact binomial McNemar test on the
  discordant items), ``flips_right_to_wrong`` and ``flips_wrong_to_right``; for LAMBADA also
  ``ppl_ratio`` = ppl(scheme) / ppl(fp) with a paired-bootstrap interval.

Per-item values go to ``results.details["tasks"][task]`` (a generative task's texts too, ``responses``).

The main thread runs the models (task by task, variant by variant); a worker tokenizes the next
tasks, and another scores and records each answered variant while the device answers the next.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import math
import re
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evalsuite.data import TASKS_DIR
from evalsuite.errors import EvalsuiteError, first_line
from evalsuite.measure import Stage, families, tokenization

DEFAULT_SUITE = "standard"
PAIRED_METRIC = "acc"
# binary per-item metrics paired like acc (generative tasks: exact match after each answer filter)
PAIRED_PREFIXES = ("acc", "exact_match")
FEWSHOT_SEED = 1234  # lm-eval's evaluator seeds every task's few-shot sampler with this
RENAMED = {"perplexity": "ppl"}


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--tasks", help="lm-eval task names or suites (tags), comma separated "
                                   f"(default: the '{DEFAULT_SUITE}' suite)")
    g.add_argument("--suite", help="a suite of tasks by name: quick (arc_easy, piqa, lambada_openai) or standard "
                                   "(the eight mirrored tasks); any tag of the task YAMLs works. smoke: the "
                                   "eight tasks (or those of --tasks) on the small sample shipped inside evalsuite "
                                   "(replaces --data-dir; results marked partial)")
    g.add_argument("--tasks-dir", action="append", default=[],
                   help="another folder of lm-eval task YAMLs (repeatable); its tasks override ours of the same name")
    g.add_argument("--task-limit", type=int, help="evaluate at most N items per task (default --limit; marks results partial)")
    g.add_argument("--task-batch-size", type=int, help="sequences per forward (default 4096 on GPU, 32 on CPU)")
    g.add_argument("--task-batch-tokens", type=int,
                   help="padded tokens per forward (default on GPU: up to 262144, fewer for wide models so the "
                        "largest activation stays near 2 GiB; 4096 on CPU)")
    g.add_argument("--task-packing", choices=["auto", "off"], default="auto",
                   help="auto: on a GPU, a Llama-architecture model runs packed batches (no padding; a context "
                        "shared by several continuations computed once); off: padded batches")
    g.add_argument("--lm-adapter", choices=["fast", "hf"], default="fast",
                   help="fast: evalsuite's TorchLM; hf: lm-eval's HFLM (slower; for cross-checks)")


# ------------------------------------------------------------------------------------------ tasks
def task_dirs(extra: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Our tasks/ folder, then the user's folders (later folders override earlier ones)."""
    dirs = [TASKS_DIR]
    for d in extra:
        p = Path(d)
        if not p.is_dir():
            raise EvalsuiteError(f"--tasks-dir {d}: no such directory")
        dirs.append(p.resolve())
    return dirs


def check_yaml_files(dirs: list[Path]) -> None:
    """lm-eval silently skips a YAML it cannot parse; we name it instead."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for d in dirs:
        for path in sorted(d.glob("**/*.yaml")):
            try:
                cfg = load_yaml(path, resolve_func=False)
            except Exception as e:  # yaml raises many types (scanner, parser, constructor errors)
                raise EvalsuiteError(f"{path}: malformed task YAML ({first_line(e)})") from None
            if not isinstance(cfg, dict) or not ({"task", "group", "class"} & set(cfg)):
                raise EvalsuiteError(f"{path}: not a task definition (needs a 'task' or 'group' key)")


def task_manager(dirs: list[Path], data_dir: Path | None):
    """A TaskManager over our folders only (lm-eval's 14k built-in tasks take seconds to index).
    ``data_dir`` reaches each task's dataset loader through the metadata."""
    from lm_eval.tasks import TaskManager

    check_yaml_files(dirs)
    meta = {"data_dir": str(data_dir.resolve())} if data_dir is not None else None
    return TaskManager(include_path=[str(d) for d in dirs], include_defaults=False, metadata=meta)


def resolve_task_names(tm, spec: str) -> list[str]:
    """Task names (in the order given) from names, suites (tags) and groups."""
    names: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in tm.all_subtasks:
            found = [item]
        elif item in tm.all_tags:
            found = sorted(tm.task_index[item].tags)
        elif item in tm.all_groups:
            found = list(tm.load([item])["tasks"])
        else:
            known = ", ".join(tm.all_subtasks)
            suites = ", ".join(tm.all_tags)
            raise EvalsuiteError(f"unknown task {item!r}; known tasks: {known}; suites: {suites}")
        names += [n for n in found if n not in names]
    if not names:
        raise EvalsuiteError("no tasks given")
    return names


def load_task(tm, name: str):
    """Build one lm-eval task with its dataset; data problems become one-line errors."""
    try:
        task = tm.load([name])["tasks"][name]
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
        return task
    except EvalsuiteError:
        raise
    except ValueError as e:  # mirror.DataError and lm-eval's config errors
        raise EvalsuiteError(f"task {name}: {first_line(e)}") from None
    except Exception as e:  # the Hub offline, a missing dataset, a bad template
        raise EvalsuiteError(f"task {name}: cannot load ({type(e).__name__}: {first_line(e)}); "
                             "for the local mirror pass --data-dir") from None


# ------------------------------------------------------------------------------------------ running
def build_requests(task, limit: int | None) -> dict[int, list]:
    """The task's instances grouped by doc id, each group in lm-eval's order (by ``idx``)."""
    task.build_all_requests(limit=limit, rank=0, world_size=1, cache_requests=False)
    by_doc: dict[int, list] = defaultdict(list)
    for inst in task.instances:
        by_doc[inst.doc_id].append(inst)
    for group in by_doc.values():
        group.sort(key=lambda inst: inst.idx)
    return dict(sorted(by_doc.items()))


def run_model(lm, task, by_doc: dict[int, list], rank: int = 0, world_size: int = 1) -> dict[int, dict[str, Any]]:
    """Per-doc metric values of one model: its responses, lm-eval's filters, ``process_results``."""
    return score(task, by_doc, answer(lm, by_doc, rank, world_size))


def answer(lm, by_doc: dict[int, list], rank: int = 0, world_size: int = 1) -> list[Any]:
    """The model's response to every instance of the task (in by_doc order); only the instances'
    arguments are read, so another variant's responses can be scored meanwhile."""
    from evalsuite.distributed import gather, shard

    instances = [inst for group in by_doc.values() for inst in group]
    by_type: dict[str, list[int]] = defaultdict(list)
    for k, inst in enumerate(instances):
        by_type[inst.request_type].append(k)
    answers: list[Any] = [None] * len(instances)
    for req_type, idx in by_type.items():
        mine = shard(idx, rank, world_size)
        got = getattr(lm, req_type)([instances[k] for _, k in mine]) if mine else []
        for k, response in zip(idx, gather(list(zip((i for i, _ in mine), got)), world_size)):
            answers[k] = response
    return answers


def score(task, by_doc: dict[int, list], answers: list[Any]) -> dict[int, dict[str, Any]]:
    """Per-doc metric values from one model's responses: lm-eval's filters and ``process_results``.
    Every instance's response slots are set anew, so nothing of a previous variant is reused.
    A task with several filters (GSM8K's strict and flexible answer extraction) has each metric once
    per filter, named ``metric_filter`` (``exact_match_strict_match``); with one filter, ``metric``."""
    instances = [inst for group in by_doc.values() for inst in group]
    for inst, response in zip(instances, answers, strict=True):
        inst.resps = [response]
        inst.filtered_resps = {}
    task.apply_filters()
    keys = list(instances[0].filtered_resps)
    out = {}
    for doc_id, group in by_doc.items():
        merged: dict[str, Any] = {}
        for key in keys:
            values = task.process_results(group[0].doc, [inst.filtered_resps[key] for inst in group])
            suffix = "" if len(keys) == 1 else "_" + re.sub(r"\W+", "_", key).strip("_")
            merged.update({m + suffix: v for m, v in values.items()})
        out[doc_id] = merged
    return out


def base_metric(metric: str, known) -> str:
    """The task's metric a per-filter name stands for (``exact_match_strict_match`` -> ``exact_match``)."""
    if metric in known:
        return metric
    return max((k for k in known if metric.startswith(k + "_")), key=len, default=metric)


def loglikelihoods(by_doc: dict[int, list]) -> list[list[float]] | None:
    """Each doc's log-likelihoods in nats (one per choice / continuation), from the last run; None
    when the task generates its answers (a generated text has no log-likelihood: not applicable,
    not a missing value)."""
    out = []
    for group in by_doc.values():
        vals = []
        for inst in group:
            r = inst.resps[0] if inst.resps else None
            if isinstance(r, tuple):
                r = r[0]
            if not isinstance(r, (int, float)) or isinstance(r, bool):
                return None
            vals.append(float(r))
        out.append(vals)
    return out


def make_lm(ctx, model, encode_cache: dict, plan_cache: dict | None = None, memory_budget: int | None = None):
    """The adapter for one variant: a fresh object, never a cache of answers shared with another
    variant (the tokens and batch plans it may share do not depend on the model)."""
    from evalsuite.measure.lm_adapter import TorchLM

    batch_size = ctx.option("task_batch_size")
    if ctx.option("lm_adapter", "fast") == "hf":
        from lm_eval.models.huggingface import HFLM
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise EvalsuiteError("--lm-adapter hf needs a Hugging Face model; use the default fast adapter")
        return HFLM(pretrained=model, tokenizer=ctx.tokenizer, batch_size=batch_size or 32, device=str(ctx.device))
    return TorchLM(model, ctx.tokenizer, device=ctx.device, batch_size=batch_size,
                   batch_tokens=ctx.option("task_batch_tokens"), encode_cache=encode_cache, plan_cache=plan_cache,
                   show_progress=ctx.show_progress and ctx.is_writer,
                   packed=False if ctx.option("task_packing", "auto") == "off" else None, memory_budget=memory_budget)


# ------------------------------------------------------------------------------------------ statistics
def _is_binary(values: list[Any]) -> bool:
    return all(isinstance(v, (bool, int, float, np.floating, np.integer)) and float(v) in (0.0, 1.0) for v in values)


def variant_records(task, name: str, variant: str, per_doc: list[dict[str, Any]], extra: dict) -> list[dict]:
    """Record kwargs for every metric of one variant on one task."""
    from lm_eval.api.metrics import mean

    from evalsuite.stats import bootstrap_ratio_of_sums, mean_stderr, percentile_ci

    aggregation, hib = task.aggregation(), task.higher_is_better()
    out = []
    for metric in per_doc[0]:
        values = [d[metric] for d in per_doc]
        base = base_metric(metric, aggregation)
        agg = aggregation.get(base)
        rec = dict(stage="tasks", task=name, variant=variant, metric=RENAMED.get(metric, metric), n=len(values),
                   higher_is_better=hib.get(base), extra=dict(extra))
        if agg is mean or agg is None:
            value, stderr = mean_stderr(np.asarray(values, dtype=np.float64))
            rec.update(value=value, stderr=None if math.isnan(stderr) else stderr,
                       unit="fraction" if _is_binary(values) else "mean",
                       definition=f"mean over {len(values)} items of lm-eval's per-item {metric}; stderr of the mean")
        elif metric == "perplexity":
            ll = np.asarray(values, dtype=np.float64)
            reps = np.exp(-bootstrap_ratio_of_sums(ll, np.ones_like(ll), seed=0))
            rec.update(value=float(np.exp(-ll.mean())), unit="perplexity", ci95=percentile_ci(reps),
                       definition="exp(-mean over items of the target's log-likelihood in nats) (lm-eval's "
                                  "per-item perplexity); ci95 by bootstrap over items")
        else:
            unit = "bits/byte" if metric == "bits_per_byte" else "perplexity" if "perplexity" in metric else metric
            rec.update(value=float(agg(values)), unit=unit,
                       definition=f"lm-eval aggregation {getattr(agg, '__name__', agg)} of per-item {metric}")
        out.append(rec)
    return out


def _delta_interval(a: np.ndarray, b: np.ndarray, seed: int) -> list[float]:
    from evalsuite.stats import paired_bootstrap_mean_diff, paired_proportion_diff_ci

    boot = paired_bootstrap_mean_diff(a, b, seed=seed)
    if not (_is_binary(a.tolist()) and _is_binary(b.tolist())):
        return boot
    score = paired_proportion_diff_ci(a > 0.5, b > 0.5)
    return [min(boot[0], score[0]), max(boot[1], score[1])]


def paired_metrics(doc: dict) -> list[str]:
    """The per-item metrics paired between fp and a variant: ``acc`` and every exact match."""
    return [m for m in doc if m == PAIRED_METRIC or any(m == p or m.startswith(p + "_") for p in PAIRED_PREFIXES[1:])]


def paired_names(metric: str) -> dict[str, str]:
    """Record names of the paired statistics of ``metric``: ``delta_acc``, ``mcnemar_p``, ``flips_*``
    for acc (as before), the same with ``_<metric>`` appended otherwise (``mcnemar_p_exact_match_strict_match``)."""
    suffix = "" if metric == PAIRED_METRIC else f"_{metric}"
    return {"delta": f"delta_{metric}", "mcnemar": f"mcnemar_p{suffix}",
            "right_to_wrong": f"flips_right_to_wrong{suffix}", "wrong_to_right": f"flips_wrong_to_right{suffix}"}


def paired_records(name: str, variant: str, fp_docs: list[dict], q_docs: list[dict], extra: dict,
                   seed: int = 0) -> list[dict]:
    """delta_acc / mcnemar_p / flips (and ppl_ratio for perplexity tasks) of ``variant`` against fp."""
    from evalsuite.stats import mcnemar_exact, paired_bootstrap_mean_diff

    out = []
    common = dict(stage="tasks", task=name, variant=variant, extra=dict(extra))
    for metric in paired_metrics(fp_docs[0]):
        a = np.asarray([d[metric] for d in fp_docs], dtype=np.float64)
        b = np.asarray([d[metric] for d in q_docs], dtype=np.float64)
        if not (_is_binary(a.tolist()) and _is_binary(b.tolist())):
            continue
        n = a.size
        names = paired_names(metric)
        p, r2w, w2r = mcnemar_exact(a > 0.5, b > 0.5)
        out += [
            dict(common, metric=names["delta"], value=float(b.mean() - a.mean()), unit="fraction", n=n,
                 higher_is_better=True, ci95=_delta_interval(a, b, seed),
                 definition=f"{metric}(variant) - {metric}(fp) on the same items; ci95 the hull of a paired "
                            "bootstrap over items and Newcombe's paired score interval (honest when few items flip)"),
            dict(common, metric=names["mcnemar"], value=p, unit="p-value", n=n, higher_is_better=None,
                 definition=f"exact two-sided McNemar test (binomial on the items only one of fp and variant "
                            f"gets right by {metric})"),
            dict(common, metric=names["right_to_wrong"], value=float(r2w), unit="items", n=n, higher_is_better=False,
                 definition=f"items fp gets right and the variant wrong ({metric})"),
            dict(common, metric=names["wrong_to_right"], value=float(w2r), unit="items", n=n, higher_is_better=None,
                 definition=f"items fp gets wrong and the variant right ({metric})"),
        ]
    if "perplexity" in fp_docs[0]:
        la = np.asarray([d["perplexity"] for d in fp_docs], dtype=np.float64)
        lb = np.asarray([d["perplexity"] for d in q_docs], dtype=np.float64)
        lo, hi = paired_bootstrap_mean_diff(lb, la, seed=seed)  # mean(la - lb) = ln ppl ratio
        out.append(dict(common, metric="ppl_ratio", value=float(np.exp((la - lb).mean())), unit="ratio", n=la.size,
                        higher_is_better=False, ci95=[math.exp(lo), math.exp(hi)],
                        definition="ppl(variant) / ppl(fp) on the same items; ci95 by paired bootstrap over items"))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)  # a non-finite one is saved as null and counted (see evalsuite.results)
    return str(v)


# ------------------------------------------------------------------------------------------ the stage
@contextlib.contextmanager
def lm_eval_session():
    """lm-eval, quieter and faster, inside the block:

    - its per-task warnings (custom datasets, per-request progress) go to ERROR level, so stderr stays
      readable;
    - each Jinja prompt template is compiled once: lm-eval's ``apply_template`` compiles the template
      string again for every document, which was 90% of request building (22.7 s of 25 s for the
      eight standard tasks on a 2-core CPU). Rendering is unchanged: the same environment compiles
      the same string, once; each render also skips re-reading the template's globals (a ChainMap
      walked twice per document);
    - a task's documents are read from its dataset in one columnar conversion, not row by row, also
      where lm-eval lists its few-shot pool when a task is built (for a zero-shot task without a
      few-shot split that pool is the whole test set, converted row by row: 0.15 s of ARC-Easy's 0.25 s).
    """
    from lm_eval import utils
    from lm_eval.api.task import ConfigurableTask, Task

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    original = utils.apply_template
    compiled = functools.lru_cache(maxsize=4096)(lambda source: _renderer(utils.env.from_string(source)))
    utils.apply_template = lambda template, doc: compiled(template)(doc)
    iterate = Task.doc_iterator
    Task.doc_iterator = _columnar_doc_iterator(iterate)
    fewshot = ConfigurableTask.fewshot_docs
    ConfigurableTask.fewshot_docs = _columnar_fewshot_docs(fewshot)
    try:
        yield
    finally:
        ConfigurableTask.fewshot_docs = fewshot
        Task.doc_iterator = iterate
        utils.apply_template = original
        logger.setLevel(level)


def _columnar_doc_iterator(original):
    """lm-eval's ``Task.doc_iterator`` over a ``datasets.Dataset`` converted to dicts in one columnar
    call (``to_list``) instead of row by row (a quarter of request building): the same (index, doc)
    pairs in the same order. Anything else goes to ``original``."""

    def doc_iterator(self, *, rank: int = 0, limit: int | None = None, world_size: int = 1, samples=None):
        import datasets
        from lm_eval import utils

        docs = self.eval_docs
        if samples or not isinstance(docs, datasets.Dataset):
            return original(self, rank=rank, limit=limit, world_size=world_size, samples=samples)
        limit = int(limit) if limit else None
        rows = (docs.select(range(min(limit, len(docs)))) if limit is not None else docs).to_list()
        return utils.create_iterator(enumerate(rows), rank=int(rank), limit=limit, world_size=int(world_size))

    return doc_iterator


def _columnar_fewshot_docs(original):
    """lm-eval's ``ConfigurableTask.fewshot_docs`` with a ``datasets.Dataset`` converted to a list of
    dicts in one columnar call: the same documents in the same order (its one caller, the task's
    constructor, makes a list of them anyway)."""

    def fewshot_docs(self):
        import datasets

        docs = original(self)
        return docs.to_list() if isinstance(docs, datasets.Dataset) else docs

    return fewshot_docs


def _renderer(template) -> Any:
    """``template.render(**doc)`` as a function of ``doc``, with the template's globals copied once:
    the same context (globals overlaid by the document's fields) and the same output."""
    env = template.environment
    if env.is_async:
        return lambda doc: template.render(**doc)
    globals_ = dict(template.globals)

    def render(doc: dict) -> str:
        ctx = env.context_class(env, {**globals_, **doc}, template.name, template.blocks, globals=globals_)
        try:
            return env.concat(template.root_render_func(ctx))
        except Exception:
            env.handle_exception()

    return render


def run(ctx) -> None:
    limit = ctx.option("task_limit") or ctx.limit
    if limit is not None:
        ctx.results.run["partial"] = True
    details = ctx.results.details.setdefault("tasks", {})
    tokenization.note(ctx.results.run, tokenization.bos_rule(ctx.tokenizer))
    families.note(ctx.results.run, ctx.fp)
    scoring = _Scoring()
    with lm_eval_session(), _host_tuned(), ThreadPoolExecutor(1, thread_name_prefix="evalsuite-tokenize") as pool:
        tm, names = _selected_tasks(ctx.option, ctx.data_dir)
        ctx.results.run["tasks_requested"] = list(names)  # the judge checks each has records
        encode_cache: dict[str, list[int]] = {}
        seed = int(ctx.option("seed", 0) or 0)
        # every task's requests first (a task that cannot be built raises when it is reached, after
        # the tasks before it are recorded); then a worker tokenizes them in order, in the Rust
        # tokenizer without the GIL, while the device answers the tasks before
        built: list[tuple[Any, dict[int, list]] | EvalsuiteError] = []
        for name in names:
            try:
                built.append(_build(tm, name, limit))
            except EvalsuiteError as e:
                built.append(e)
        fast = ctx.option("lm_adapter", "fast") == "fast"
        # one memory budget for the stage, measured with every variant on the device: every variant
        # gets the same batch plan (and fp's cache entry a key that does not drift within a run)
        from evalsuite.measure.memory import free_bytes

        budget = free_bytes(ctx.device)
        encoder = make_lm(ctx, next(iter(ctx.variants.values())), encode_cache, memory_budget=budget) if fast else None
        tokenized = [pool.submit(encoder.pretokenize, [i for g in b[1].values() for i in g])
                     if encoder is not None and not isinstance(b, EvalsuiteError) else None for b in built]
        try:
            for name, b, tokens in zip(names, built, tokenized):
                scoring.check()
                if isinstance(b, EvalsuiteError):
                    raise b
                if tokens is not None:
                    tokens.result()
                evaluate_task(ctx, name, *b, limit, details, encode_cache, seed, scoring, memory_budget=budget)
        except BaseException:
            scoring.close(raise_errors=False)  # what was answered is recorded before the error surfaces
            raise
        finally:
            for future in tokenized:
                if future is not None:
                    future.cancel()
        scoring.close()  # inside the session: lm-eval's scoring runs as it did in the loop


class _Scoring:
    """Scores and records each answered variant in a worker thread, in order, while the main thread
    runs the device on the next ones: lm-eval's per-item scoring, our statistics and the checkpoint
    (a quarter of the stage's time on an H200 host) overlap the forwards, whose kernel launches
    release the GIL while the device is busy. All results are written by this worker.
    ``check()`` raises a worker's error in the main thread (variants answered before the main thread
    sees it are still recorded); ``close()`` waits for every job."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="evalsuite-score")
        self._jobs: list = []

    def submit(self, fn, *args) -> None:
        self._jobs.append(self._pool.submit(fn, *args))

    def check(self) -> None:
        for job in self._jobs:
            if job.done() and job.exception() is not None:
                raise job.exception()

    def close(self, raise_errors: bool = True) -> None:
        self._pool.shutdown(wait=True)
        if raise_errors:
            self.check()


@contextlib.contextmanager
def _host_tuned():
    """The Python host feeding the device, inside the block:

    - no cyclic garbage collection. The stage keeps millions of objects to its end (documents,
      instances, token lists), and each full collection walks them all: on an H200 host the
      collections of one run of the eight tasks took 1.6 s, at random points, while the device
      waited for its next kernels. The stage's garbage is freed by reference counts; the few cycles
      wait for the block's end;
    - a 0.5 ms GIL switch interval (Python's default is 5 ms): the main thread, back from a kernel
      launch, waits at most that long for the tokenizing or scoring worker to let go of the GIL.
    """
    enabled, interval = gc.isenabled(), sys.getswitchinterval()
    gc.disable()
    sys.setswitchinterval(min(interval, 0.0005))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if enabled:
            gc.enable()


def _build(tm, name: str, limit: int | None) -> tuple[Any, dict[int, list]]:
    task = load_task(tm, name)
    by_doc = build_requests(task, limit)
    if not by_doc:
        raise EvalsuiteError(f"task {name}: no items to evaluate")
    return task, by_doc


def _selected_tasks(option: Callable[..., Any], data_dir: Path | None):
    """The task manager and the task names of the run (``option``: the run's ``option(name)`` reader)."""
    suite = option("suite")
    if suite == "smoke" and option("tasks"):  # smoke names the data there; --tasks picks from it
        suite = None
    spec = ",".join(s for s in (option("tasks"), suite) if s) or DEFAULT_SUITE
    tm = task_manager(task_dirs(option("tasks_dir") or []), data_dir)
    return tm, resolve_task_names(tm, spec)


def validate(config) -> None:
    """Check task names and YAML files before the model loads, so a typo costs a second, not a load."""
    limit = config.option("task_limit")
    if limit is not None and limit < 1:
        raise EvalsuiteError("--task-limit must be at least 1")
    data_dir = Path(config.option("data_dir")) if config.option("data_dir") else None
    with lm_eval_session():
        _selected_tasks(config.option, data_dir)


def evaluate_task(ctx, name: str, task, by_doc: dict[int, list], limit: int | None, details: dict,
                  encode_cache: dict, seed: int, scoring: _Scoring | None = None,
                  memory_budget: int | None = None) -> None:
    """Answer the task with every variant on the main thread (the device's work) and hand each
    answered variant to ``scoring`` (inline when None) for scoring and recording."""
    extra = {"partial": limit is not None, "limit": limit, "adapter": ctx.option("lm_adapter", "fast")}
    per_variant: dict[str, list[dict]] = {}
    plans: dict = {}  # the variants answer the same instances: batch them once
    # positions each variant's forwards computed (benchmarks' MFU), beside the per-task details
    forward_tokens = ctx.results.details.setdefault("tasks_forward_tokens", {}).setdefault(name, {})
    for variant, model in ctx.variants.items():
        t0 = time.perf_counter()
        cache = _fp_cache_entry(ctx, name, by_doc, limit, memory_budget) if variant == "fp" else None
        answers = _cached_answers(cache.load()) if cache is not None else None
        if answers is None:
            lm = make_lm(ctx, model, encode_cache, plans, memory_budget)
            # the fused forward for our adapter only: --lm-adapter hf cross-checks lm-eval's own path
            with ctx.fused_forwards(model if ctx.option("lm_adapter", "fast") == "fast" else None):
                answers = answer(lm, by_doc, ctx.rank, ctx.world_size)
            forward_tokens[variant] = getattr(lm, "forward_tokens", None)
            if getattr(lm, "generation_info", None):  # the decoding path (static / dynamic) and any fallback
                extra.setdefault("decoding", {})[variant] = dict(lm.generation_info)
            if getattr(lm, "generation_notes", None):
                extra["generation"] = ("greedy decoding; sampling arguments ignored: "
                                       + ", ".join(sorted(lm.generation_notes)))
            if cache is not None and ctx.is_writer:
                cache.store({"answers": [list(a) if isinstance(a, tuple) else a for a in answers]})
        seconds = round(time.perf_counter() - t0, 3)
        args = (ctx, name, task, by_doc, limit, details, variant, answers, seconds, per_variant, extra, seed)
        if scoring is None:
            _record_variant(*args)
        else:
            scoring.submit(_record_variant, *args)


def _fp_cache_entry(ctx, name: str, by_doc: dict[int, list], limit: int | None, memory_budget: int | None = None):
    """fp's cache entry for one task, keyed by its requests (documents, templates, few-shot examples
    as lm-eval built them) and the adapter's batch settings; None with --fp-cache off."""
    from evalsuite.measure import fp_cache
    from evalsuite.measure.batch_plan import gpu_batch_tokens, gpu_scored_rows

    if ctx.option("fp_cache", "off") == "off":
        return None
    cfg = getattr(ctx.fp, "config", None)
    plan = ([gpu_batch_tokens(cfg, memory_budget), gpu_scored_rows(getattr(cfg, "vocab_size", None) or 128_000, memory_budget)]
            if ctx.device.type == "cuda" else None)
    requests = [[inst.request_type, inst.arguments] for group in by_doc.values() for inst in group]
    return fp_cache.Entry(ctx, f"tasks-{name}", {
        "task": name, "requests_sha256": fp_cache.digest(requests), "limit": limit,
        "adapter": ctx.option("lm_adapter", "fast"), "batch_size": ctx.option("task_batch_size"),
        "batch_tokens": ctx.option("task_batch_tokens"), "gpu_plan": plan, "packing": ctx.option("task_packing", "auto")})


def _cached_answers(payload: dict | None) -> list | None:
    """Responses as lm-eval gives them (log-likelihood requests answer tuples; JSON keeps lists)."""
    if payload is None:
        return None
    return [tuple(a) if isinstance(a, list) else a for a in payload["answers"]]


def _record_variant(ctx, name: str, task, by_doc: dict[int, list], limit: int | None, details: dict, variant: str,
                    answers: list, seconds: float, per_variant: dict[str, list[dict]], extra: dict, seed: int) -> None:
    """Score one variant's answers and record them: per-item values, records, paired records, checkpoint."""
    if name not in details:
        details[name] = {"n": len(by_doc), "limit": limit, "doc_ids": list(by_doc), "seconds": {}, "values": {},
                         "loglikelihoods": {}}
    entry = details[name]
    per_doc = list(score(task, by_doc, answers).values())
    entry["seconds"][variant] = seconds
    # per-item data is final once computed: each checkpoint reuses its JSON text
    entry["values"][variant] = ctx.results.seal({m: [_jsonable(d[m]) for d in per_doc] for m in per_doc[0]})
    lls = loglikelihoods(by_doc)
    if lls is not None and isinstance(entry["loglikelihoods"], dict):
        entry["loglikelihoods"][variant] = ctx.results.seal(lls)
    else:  # a generative task: its items are judged by exact match (values), never by likelihood
        entry["loglikelihoods"] = "not applicable"
    if answers and all(isinstance(a, str) for a in answers):  # a generative task: the generated texts
        entry.setdefault("responses", {})[variant] = ctx.results.seal(list(answers))
    per_variant[variant] = per_doc
    for rec in variant_records(task, name, variant, per_doc, dict(extra, seconds=seconds)):
        ctx.results.add(**rec)
    if variant != "fp" and "fp" in per_variant:
        for rec in paired_records(name, variant, per_variant["fp"], per_doc, extra, seed=seed):
            ctx.results.add(**rec)
    ctx.checkpoint()


STAGE = Stage(name="tasks", help="downstream tasks through lm-eval, fp vs each variant on the same items",
              run=run, add_arguments=add_arguments, validate=validate)
