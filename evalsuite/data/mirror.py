"""``evalsuite data fetch DIR`` and ``evalsuite data check DIR``: build a local mirror from the
Hugging Face Hub, and validate one (files, rows, row formats), one line per task.

The Hub rows are converted into the mirror's row formats by the converters in ``tasks/mirror.py``
(the same code a task uses when it reads the Hub directly), so a fetched mirror and the Hub give
a task the same rows.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from evalsuite.data import WIKITEXT_FILES, WIKITEXT_HUB, TaskSource, task_sources, tasks_dir
from evalsuite.errors import EvalsuiteError

# (path, name, split) -> rows; datasets.load_dataset by default, a fake in tests
Loader = Callable[[str, "str | None", str], Iterable[dict[str, Any]]]


@lru_cache(maxsize=1)
def task_functions():
    """``tasks/mirror.py`` (a plain folder beside the package, as lm-eval's ``!function`` needs)."""
    spec = importlib.util.spec_from_file_location("evalsuite_tasks_mirror", tasks_dir() / "mirror.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hub_loader(path: str, name: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as e:  # offline, no such dataset, the Hub refused
        from evalsuite.errors import first_line

        raise EvalsuiteError(f"cannot fetch {path} ({name}, {split}) from the Hugging Face Hub: "
                             f"{type(e).__name__}: {first_line(e, 200)}") from None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def fetch(directory: Path, loader: Loader = hub_loader, sources: list[TaskSource] | None = None,
          echo: Callable[[str], None] = print) -> list[Path]:
    """Write every mirrored task's rows and WikiText-2's splits into ``directory``; returns the files."""
    import json

    fns = task_functions()
    written = []
    for split, rel in WIKITEXT_FILES.items():
        rows = loader(WIKITEXT_HUB["path"], WIKITEXT_HUB["name"], "validation" if split == "valid" else split)
        text = "".join(r["text"] for r in rows)
        _write_atomic(directory / rel, text)
        written.append(directory / rel)
        echo(f"wikitext-2 {split}: {len(fns.wikitext_articles(text))} articles -> {directory / rel}")
    for s in sources if sources is not None else task_sources():
        if s.format == "documents" or not s.hub:
            continue  # WikiText's document task reads the ppl stage's file, written above
        convert = fns.HUB_CONVERTERS[s.hub["convert"]]
        hub_splits = {"test": s.hub["split"], "train": s.hub.get("fewshot_split", fns.FEWSHOT_SPLIT)}
        for split, rel in s.files().items():
            rows = []
            for i, raw in enumerate(loader(s.hub["path"], s.hub.get("name"), hub_splits[split])):
                row = convert(raw)
                problem = fns.check_row(row, s.format)
                if problem:
                    raise EvalsuiteError(f"{s.task}: {s.hub['path']} row {i}: {problem}")
                rows.append(json.dumps(row, ensure_ascii=False) + "\n")
            if not rows:
                raise EvalsuiteError(f"{s.task}: {s.hub['path']} ({hub_splits[split]}) has no rows")
            _write_atomic(directory / rel, "".join(rows))
            written.append(directory / rel)
            echo(f"{s.task}{'' if split == 'test' else ' ' + split}: {len(rows)} rows -> {directory / rel}")
    return written


@dataclass
class MirrorCheck:
    """One task's file in a mirror: how many rows (articles for WikiText) and what is wrong, if anything."""

    task: str
    path: str
    format: str
    rows: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        what = f"{self.rows} {'articles' if self.format == 'documents' else 'rows'}" if self.rows is not None else "-"
        return f"{'ok ' if self.ok else 'BAD'}  {self.task:<16} {self.path:<32} {self.format:<16} " + \
               (what if self.ok else self.problem)


def check(directory: Path, sources: list[TaskSource] | None = None) -> list[MirrorCheck]:
    """Validate every file of the layout in ``directory``: present, readable, every row in its format."""
    fns = task_functions()
    out = []
    for split, rel in WIKITEXT_FILES.items():
        c = MirrorCheck(f"wikitext-2-{split}", rel, "documents")
        path = directory / rel
        try:
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        except UnicodeDecodeError as e:
            text, c.problem = None, f"not UTF-8 text (bad byte at offset {e.start})"
        if text is None and c.problem is None:
            c.problem = "missing"
        elif text is not None:
            c.rows = len(fns.wikitext_articles(text))
            if c.rows == 0 or not any(fns._HEADING.match(ln) for ln in text.splitlines()):
                c.problem = "no ' = Title = ' article headings (not WikiText-2 v1 text)"
        out.append(c)
    for s in sources if sources is not None else task_sources():
        if s.format == "documents":
            continue
        for split, rel in s.files().items():  # the few-shot file is checked as "<task>-train"
            c = MirrorCheck(s.task if split == "test" else f"{s.task}-{split}", rel, s.format)
            path = directory / rel
            if not path.is_file():
                c.problem = "missing"
            else:
                try:
                    c.rows = len(fns.read_mirror(path, s.format))
                except (ValueError, UnicodeDecodeError) as e:  # DataError names the file and line
                    c.problem = str(e).replace(str(path), path.name, 1)
            out.append(c)
    return out
