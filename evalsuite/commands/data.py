"""``evalsuite data fetch DIR`` (mirror every shipped task from the Hub) and ``evalsuite data check DIR``
(one line per task: file, format, rows or what is wrong; exit 1 when anything is)."""

from __future__ import annotations

import argparse
from pathlib import Path

from evalsuite.errors import EvalsuiteError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["fetch", "check"],
                   help="fetch: download every mirrored task and WikiText-2 from the Hugging Face Hub into DIR; "
                        "check: validate the files in DIR")
    p.add_argument("dir", metavar="DIR", help="the mirror folder (what --data-dir / $EVALSUITE_DATA_DIR then points at)")


def main(args: argparse.Namespace) -> int:
    from evalsuite.data import mirror

    directory = Path(args.dir)
    if args.action == "fetch":
        directory.mkdir(parents=True, exist_ok=True)
        files = mirror.fetch(directory)
        print(f"mirror: {len(files)} files in {directory}; use it with --data-dir {directory}")
        return 0
    if not directory.is_dir():
        raise EvalsuiteError(f"{directory}: no such directory")
    checks = mirror.check(directory)
    for c in checks:
        print(c.line())
    bad = [c for c in checks if not c.ok]
    print(f"mirror {directory}: {len(checks) - len(bad)} of {len(checks)} files ok" +
          (f"; fix or re-fetch: evalsuite data fetch {directory}" if bad else ""))
    return 1 if bad else 0
