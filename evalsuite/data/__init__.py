"""Evaluation data: the embedded smoke suite, and fetching or checking a full local mirror.

The mirror's layout (what ``--data-dir`` / ``$EVALSUITE_DATA_DIR`` points at) is named by the task
YAMLs (``dataset_kwargs.mirror``) plus WikiText-2's two splits for the ppl and layers stages::

    DIR/wikitext-2/test.txt, valid.txt      WikiText-2 v1, tokenized, ``<unk>`` kept
    DIR/downstream/<task>.jsonl             one row a line in the task's format (tasks/mirror.py)
    DIR/generative/gsm8k_test.jsonl, ...    the same, for the generative tasks; a task's ``fewshot``
                                            file (gsm8k_train.jsonl) is its few-shot pool

The smoke suite (``evalsuite/data/smoke/``) has the same layout with a few articles and the first
100 rows of each task (20 of GSM8K's test and train files); it is for checking an installation, and
its results are marked as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOKE_DIR = Path(__file__).resolve().parent / "smoke"
# the lm-eval task YAMLs and the small functions they name: tasks/ of a checkout, installed as
# evalsuite/_tasks (package data; lm-eval loads mirror.py from this folder by its path)
_INSTALLED_TASKS = Path(__file__).resolve().parents[1] / "_tasks"
TASKS_DIR = _INSTALLED_TASKS if _INSTALLED_TASKS.is_dir() else Path(__file__).resolve().parents[2] / "tasks"
SMOKE_SUITE = "smoke"
# what a smoke run evaluates unless told otherwise (--limit N for more, up to the 100 items shipped):
# minutes on a 2-core CPU, all four stages
SMOKE_LIMIT, SMOKE_PPL_CONTEXT, SMOKE_LAYER_TOKENS = 5, 512, 512
WIKITEXT_FILES = {"test": "wikitext-2/test.txt", "valid": "wikitext-2/valid.txt"}
WIKITEXT_HUB = {"path": "wikitext", "name": "wikitext-2-v1"}  # the variant corpus.py reads from the Hub


def tasks_dir() -> Path:
    return TASKS_DIR


@dataclass(frozen=True)
class TaskSource:
    """Where one task's data lives: its file in the mirror, its row format, its Hub dataset, and
    its few-shot file in the mirror (the Hub dataset's ``fewshot_split``), if it has one."""

    task: str
    mirror: str
    format: str
    hub: dict[str, Any] | None
    fewshot: str | None = None

    def files(self) -> dict[str, str]:
        """The task's mirror files by the split a task reads them as (tasks/mirror.py): ``test``, and
        ``train`` (the few-shot pool) if the task has a few-shot file."""
        return {"test": self.mirror, **({"train": self.fewshot} if self.fewshot else {})}


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):  # the task YAMLs name functions with lm-eval's !function tag
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return Loader


def task_sources(directory: Path | None = None) -> list[TaskSource]:
    """Every shipped task with a file in the local mirror, from the task YAMLs (sorted by name)."""
    import yaml

    out = []
    for path in sorted((directory or tasks_dir()).glob("*.yaml")):
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader()) or {}
        kw = cfg.get("dataset_kwargs") or {}
        if isinstance(cfg, dict) and kw.get("mirror"):
            out.append(TaskSource(cfg["task"], kw["mirror"], kw.get("format", ""), kw.get("hub"),
                                  kw.get("fewshot")))
    return out


# the downstream tasks with a mirror file (WikiText's document task shares the ppl stage's file)
MIRRORED_TASKS = {s.task: s.mirror for s in task_sources() if s.format != "documents"}
# every file of those tasks, few-shot files included: (task, split) -> file in the mirror
MIRRORED_FILES = {(s.task, split): rel for s in task_sources() if s.format != "documents"
                  for split, rel in s.files().items()}


def smoke_notice(limit: int = SMOKE_LIMIT, context: int = SMOKE_PPL_CONTEXT) -> str:
    """The one line a smoke run prints: what it used, and where the real data comes from."""
    return (f"smoke suite: the small sample shipped in {SMOKE_DIR} (sources and licences in its NOTICE), "
            f"--limit {limit} items a task and {context}-token ppl windows; its numbers check the installation and "
            "are not comparable with a full run. The real data: 'evalsuite data fetch DIR' (from the Hugging Face "
            "Hub), then --data-dir DIR or EVALSUITE_DATA_DIR=DIR")
