"""Text corpora for perplexity and calibration: WikiText-2 from a local mirror or the Hub, or a file.

The local mirror (``DATA_DIR/wikitext-2/{test,valid}.txt``) is WikiText-2 v1 as tokenized text with
``<unk>`` kept; the Hub fallback is the same variant (``wikitext``, ``wikitext-2-v1``).
"""

from __future__ import annotations

import json
from pathlib import Path

from evalsuite.errors import EvalsuiteError

WIKITEXT_SPLITS = {"test": "test.txt", "valid": "valid.txt", "validation": "valid.txt"}


def read_text_file(path: Path) -> str:
    """A .txt file as text, or a .jsonl file's ``text`` fields joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise EvalsuiteError(f"{path}: no such corpus file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalsuiteError(f"{path}: corpus is not UTF-8 text (bad byte at offset {e.start})") from None
    if path.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                parts.append(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalsuiteError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
        text = "\n\n".join(parts)
    if not text.strip():
        raise EvalsuiteError(f"{path}: corpus is empty")
    return text


def wikitext(split: str, data_dir: Path | None) -> tuple[str, str]:
    """(text, source description) of a WikiText-2 split, from ``data_dir`` or else the Hub."""
    if split not in WIKITEXT_SPLITS:
        raise EvalsuiteError(f"unknown WikiText-2 split {split!r}; known: test, valid")
    if data_dir is not None:
        path = Path(data_dir) / "wikitext-2" / WIKITEXT_SPLITS[split]
        if not path.is_file():
            raise EvalsuiteError(f"{path}: WikiText-2 {split} split not found in --data-dir {data_dir}")
        return read_text_file(path), str(path)
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-v1", split="validation" if split == "valid" else split)
    except Exception as e:  # offline, or the Hub refused: tell the user how to point at local data
        raise EvalsuiteError(f"cannot fetch WikiText-2 from the Hub ({type(e).__name__}); pass --data-dir") from None
    return "".join(ds["text"]), "hf:wikitext/wikitext-2-v1"
