"""The evaluation data mirror, in one place: how a task reads its rows (``load``, which the task
YAMLs name through ``tasks/mirror.py``), and ``evalsuite data fetch DIR`` / ``evalsuite data check DIR``,
which build a local mirror from the Hugging Face Hub and validate one (files, rows, row formats).

The Hub rows are converted into the mirror's row formats by ``HUB_CONVERTERS`` below (the same code
a task uses when it reads the Hub directly), so a fetched mirror and the Hub give a task the same rows.

The row formats (see the data folder's SOURCES.md), one prompt template in the YAML serving both sources:

- ``multiple_choice``: ``{"query": str, "choices": [str, ...], "gold": int}``
- ``partial``: ``{"context_options": [str, ...], "continuation": str, "gold": int}`` (Winogrande:
  the same continuation is scored after each context option)
- ``cloze``: ``{"context": str, "continuation": str}`` (LAMBADA: the last word)
- ``documents``: ``{"page": str}`` (WikiText: one article per row)
- ``generation``: ``{"question": str, "answer": str}`` (GSM8K: the answer's worked solution ends
  with ``#### <number>``); ``fewshot`` names a second file read as the ``train`` split, the pool
  lm-eval draws few-shot examples from

The YAML names this module's ``load`` as ``custom_dataset``; lm-eval calls it with the task's
``dataset_kwargs`` plus the run's metadata, where evalsuite puts ``data_dir`` when the user gave one.
A bad row raises ``DataError`` naming the file and line, which evalsuite turns into a one-line error.
"""


from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from evalsuite.data import WIKITEXT_FILES, WIKITEXT_HUB, TaskSource, task_sources
from evalsuite.errors import EvalsuiteError

# (path, name, split) -> rows; datasets.load_dataset by default, a fake in tests
Loader = Callable[[str, "str | None", str], Iterable[dict[str, Any]]]


SPLIT = "test"
FEWSHOT_SPLIT = "train"


class DataError(ValueError):
    """A data file that does not have the fields or values its task format needs."""


def load(format: str, mirror: str | None = None, hub: dict[str, Any] | None = None, data_dir: str | None = None,
         fewshot: str | None = None, **_: Any):
    """``{"test": Dataset}`` in the mirror's row format: from ``data_dir/mirror`` when a data dir is
    given and the task has a mirror file, else from the Hub; with ``fewshot`` (a mirror file; on the
    Hub the ``fewshot_split`` of the same dataset) also ``{"train": Dataset}``."""
    import datasets

    splits = {}
    if data_dir and mirror:
        splits[SPLIT] = read_mirror(Path(data_dir) / mirror, format)
        if fewshot:
            splits[FEWSHOT_SPLIT] = read_mirror(Path(data_dir) / fewshot, format)
    elif hub:
        splits[SPLIT] = read_hub(hub, format)
        if fewshot:
            splits[FEWSHOT_SPLIT] = read_hub({**hub, "split": hub.get("fewshot_split", FEWSHOT_SPLIT)}, format)
    else:
        raise DataError(f"{mirror}: this task has no Hub source; pass --data-dir with the local mirror")
    return datasets.DatasetDict({k: datasets.Dataset.from_list(rows) for k, rows in splits.items()})


def read_mirror(path: Path, format: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if format == "documents":
        return wikitext_articles(path.read_text(encoding="utf-8"))
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
            problem = check_row(row, format)
            if problem:
                raise DataError(f"{path}:{line_no}: {problem}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def check_row(row: Any, format: str) -> str | None:
    """What is wrong with one row of the given format, or None."""
    if not isinstance(row, dict):
        return "row is not a JSON object"
    fields = {"multiple_choice": (("query", str), ("choices", list), ("gold", int)),
              "partial": (("context_options", list), ("continuation", str), ("gold", int)),
              "cloze": (("context", str), ("continuation", str)),
              "generation": (("question", str), ("answer", str))}.get(format)
    if fields is None:
        return f"unknown data format {format!r}"
    for name, typ in fields:
        if name not in row:
            return f"missing field {name!r}"
        if not isinstance(row[name], typ) or (typ is int and isinstance(row[name], bool)):
            return f"field {name!r} should be a {typ.__name__}, got {type(row[name]).__name__}"
    options = row.get("choices", row.get("context_options"))
    if options is not None:
        if len(options) < 2 or not all(isinstance(o, str) for o in options):
            return "options should be a list of at least two strings"
        if not 0 <= row["gold"] < len(options):
            return f"gold label {row['gold']} is out of range for {len(options)} options"
    if format == "cloze" and not row["continuation"].strip():
        return "empty continuation"
    return None


_HEADING = re.compile(r"^ = [^=].* = $")


def wikitext_articles(text: str) -> list[dict[str, str]]:
    """Split WikiText (one article starts at each top-level `` = Title = `` line) into pages."""
    pages: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")) or not pages:
            pages.append([])
        pages[-1].append(line)
    return [{"page": "".join(p)} for p in pages if "".join(p).strip()]


def read_hub(hub: dict[str, Any], format: str) -> list[dict[str, Any]]:
    """Rows of a Hub dataset converted into the mirror format by the named converter."""
    import datasets

    ds = datasets.load_dataset(hub["path"], hub.get("name"), split=hub["split"])
    convert = HUB_CONVERTERS[hub["convert"]]
    rows = [convert(r) for r in ds]
    for i, row in enumerate(rows):
        problem = check_row(row, format) if format != "documents" else None
        if problem:
            raise DataError(f"{hub['path']} ({hub['split']}) row {i}: {problem}")
    return rows


def _arc(r):
    return {"query": f"Question: {r['question']}", "choices": list(r["choices"]["text"]),
            "gold": list(r["choices"]["label"]).index(r["answerKey"])}


def _piqa(r):
    return {"query": f"Question: {r['goal']}\n", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}


def _boolq(r):
    return {"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
            "gold": int(r["label"])}


def _copa(r):
    connector = {"cause": "because", "effect": "therefore"}[r["question"]]
    lower = [c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
    return {"query": f"{r['premise'].strip().rstrip('.')}, {connector}", "choices": lower, "gold": int(r["label"])}


def _openbookqa(r):
    return {"query": r["question_stem"], "choices": list(r["choices"]["text"]),
            "gold": list(r["choices"]["label"]).index(r["answerKey"].strip())}


def _winogrande(r):
    cut = r["sentence"].index("_")
    return {"context_options": [r["sentence"][:cut] + o for o in (r["option1"], r["option2"])],
            "continuation": r["sentence"][cut + 1:].strip(), "gold": int(r["answer"]) - 1}


def _lambada(r):
    context, word = r["text"].rsplit(" ", 1)
    return {"context": context, "continuation": word}


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(r):
    ctx = f"{r['ctx_a']} {r['ctx_b'].capitalize()}"
    return {"query": _hellaswag_clean(f"{r['activity_label']}: {ctx}"),
            "choices": [_hellaswag_clean(e) for e in r["endings"]], "gold": int(r["label"])}


def _gsm8k(r):
    return {"question": r["question"], "answer": r["answer"]}


def _wikitext(r):
    return {"page": r["page"]}


HUB_CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "arc": _arc, "piqa": _piqa, "boolq": _boolq, "copa": _copa, "openbookqa": _openbookqa,
    "winogrande": _winogrande, "lambada": _lambada, "hellaswag": _hellaswag, "wikitext": _wikitext,
    "gsm8k": _gsm8k,
}


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

    written = []
    for split, rel in WIKITEXT_FILES.items():
        rows = loader(WIKITEXT_HUB["path"], WIKITEXT_HUB["name"], "validation" if split == "valid" else split)
        text = "".join(r["text"] for r in rows)
        _write_atomic(directory / rel, text)
        written.append(directory / rel)
        echo(f"wikitext-2 {split}: {len(wikitext_articles(text))} articles -> {directory / rel}")
    for s in sources if sources is not None else task_sources():
        if s.format == "documents" or not s.hub:
            continue  # WikiText's document task reads the ppl stage's file, written above
        convert = HUB_CONVERTERS[s.hub["convert"]]
        hub_splits = {"test": s.hub["split"], "train": s.hub.get("fewshot_split", FEWSHOT_SPLIT)}
        for split, rel in s.files().items():
            rows = []
            for i, raw in enumerate(loader(s.hub["path"], s.hub.get("name"), hub_splits[split])):
                row = convert(raw)
                problem = check_row(row, s.format)
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
            c.rows = len(wikitext_articles(text))
            if c.rows == 0 or not any(_HEADING.match(ln) for ln in text.splitlines()):
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
                    c.rows = len(read_mirror(path, s.format))
                except (ValueError, UnicodeDecodeError) as e:  # DataError names the file and line
                    c.problem = str(e).replace(str(path), path.name, 1)
            out.append(c)
    return out
