"""Reading the user's configuration files (nightly matrix, gate rules, layer floors): one reader, so
every file problem is the same kind of one-line error naming the option and the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evalsuite.errors import EvalsuiteError, first_line

FORMATS = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}


def read_mapping(path: str | Path, option: str, suffixes: tuple[str, ...] = tuple(FORMATS),
                 empty_ok: bool = False) -> dict[str, Any]:
    """The top-level mapping of a YAML, TOML or JSON file (format by suffix).

    ``option`` is the command-line option that named the file (for the message); ``suffixes`` the
    formats accepted; ``empty_ok`` lets an empty YAML file stand for an empty mapping.
    """
    path = Path(path)
    where = f"{option} {path}"
    if not path.is_file():
        raise EvalsuiteError(f"{where}: no such file")
    if path.suffix not in suffixes:
        raise EvalsuiteError(f"{where}: expected a {', '.join(suffixes)} file")
    kind = FORMATS[path.suffix]
    try:
        text = path.read_text()
        if kind == "TOML":
            import tomllib

            data = tomllib.loads(text)
        elif kind == "JSON":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # UnicodeDecodeError, JSONDecodeError, yaml.YAMLError, TOMLDecodeError
        raise EvalsuiteError(f"{where}: not valid {kind} ({first_line(e)})") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise EvalsuiteError(f"{where}: expected a mapping at the top level")
    return data
