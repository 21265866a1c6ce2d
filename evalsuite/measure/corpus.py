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


# corpus names accepted by ``--ppl-corpus`` besides a file path → (WikiText-2 split, task name)
NAMED_CORPORA = {"wikitext2": ("test", "wikitext2"), "wikitext2-valid": ("valid", "wikitext2-valid")}


def load_corpus(spec: str, data_dir: Path | None) -> tuple[str, str, str]:
    """(text, source description, task name) of a named corpus (``wikitext2``, ``wikitext2-valid``)
    or of a .txt/.jsonl file; the task name of a file is its stem."""
    if spec in NAMED_CORPORA:
        split, task = NAMED_CORPORA[spec]
        text, source = wikitext(split, data_dir)
        return text, source, task
    path = Path(spec)
    if not path.exists() and path.suffix not in (".txt", ".jsonl"):
        raise EvalsuiteError(f"unknown corpus {spec!r}: give {', '.join(NAMED_CORPORA)} or a .txt/.jsonl file")
    return read_text_file(path), str(path), path.stem


def _utf8_lengths(codepoints):
    return 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)


def char_prefix_counts(text: str):
    """Prefix sums over characters: ``bytes[i]`` = UTF-8 bytes of ``text[:i]``, ``words[i]`` = words
    that start in ``text[:i]``. A word is a maximal run of non-whitespace characters, the unit of
    lm-eval's wikitext ``word_perplexity`` (``re.split(r"\\s+", doc)``, which also counts an empty
    piece for leading or trailing whitespace; we do not)."""
    import numpy as np

    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    n_bytes = np.zeros(cps.size + 1, dtype=np.int64)
    np.cumsum(_utf8_lengths(cps), out=n_bytes[1:])
    space = np.isin(cps, _WHITESPACE)
    starts = ~space & np.concatenate(([True], space[:-1]))
    n_words = np.zeros(cps.size + 1, dtype=np.int64)
    np.cumsum(starts, out=n_words[1:])
    return n_bytes, n_words


# the code points Python's str.isspace() (and so re's \s) treats as whitespace
_WHITESPACE = [c for c in range(0x3001) if chr(c).isspace()]
