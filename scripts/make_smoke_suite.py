"""Rebuild the embedded smoke suite (evalsuite/data/smoke/) from a full local mirror.

    python3 scripts/make_smoke_suite.py /path/to/data

Takes the first few WikiText-2 articles of each split and the first ROWS rows of each mirrored task's
file (GENERATION_ROWS of a generative task's test file and of its few-shot file, which needs only
num_fewshot rows; generation is slow), so the subset is reproducible from the mirror alone. The
NOTICE file beside the data is kept by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evalsuite.data import SMOKE_DIR, task_sources  # noqa: E402
from tasks.mirror import wikitext_articles  # noqa: E402

ROWS = 100
GENERATION_ROWS = 20  # GSM8K: test rows, and few-shot (train) rows (at least the task's num_fewshot, 5)
ARTICLES = {"test.txt": 3, "valid.txt": 2}


def main(src: Path) -> None:
    for name, n in ARTICLES.items():
        pages = wikitext_articles((src / "wikitext-2" / name).read_text(encoding="utf-8"))
        out = SMOKE_DIR / "wikitext-2" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(p["page"] for p in pages[:n]), encoding="utf-8")
    for rel, n in ((rel, GENERATION_ROWS if s.format == "generation" else ROWS)
                   for s in task_sources() if s.format != "documents" for rel in s.files().values()):
        lines = [ln for ln in (src / rel).read_text(encoding="utf-8").splitlines(keepends=True) if ln.strip()]
        out = SMOKE_DIR / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(lines[:n]), encoding="utf-8")
    total = sum(p.stat().st_size for p in SMOKE_DIR.rglob("*") if p.is_file())
    print(f"smoke suite: {total / 1e6:.2f} MB in {SMOKE_DIR}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
