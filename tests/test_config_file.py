"""The one reader of user configuration files: formats by suffix, one-line errors naming the file."""

from __future__ import annotations

import pytest

from evalsuite.config_file import read_mapping
from evalsuite.errors import EvalsuiteError


@pytest.mark.parametrize("name, text", [
    ("c.yaml", "a: 1\nb: [x, y]\n"),
    ("c.yml", "{a: 1, b: [x, y]}"),
    ("c.toml", 'a = 1\nb = ["x", "y"]\n'),
    ("c.json", '{"a": 1, "b": ["x", "y"]}'),
])
def test_each_format_reads_the_same_mapping(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert read_mapping(tmp_path / name, "--opt") == {"a": 1, "b": ["x", "y"]}


@pytest.mark.parametrize("name, content, message", [
    ("c.yaml", None, "no such file"),
    ("c.txt", "a: 1", r"expected a \.yaml, \.yml, \.toml, \.json file"),
    ("c.yaml", "a: [1", r"not valid YAML \("),
    ("c.toml", "a = ", r"not valid TOML \("),
    ("c.json", "{'a': 1}", r"not valid JSON \("),
    ("c.yaml", b"a: \xff\xfe\n", r"not valid YAML \("),
    ("c.yaml", "- a\n- b\n", "expected a mapping at the top level"),
    ("c.yaml", "", "expected a mapping at the top level"),
])
def test_bad_files_are_one_line_naming_option_and_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(EvalsuiteError, match=message) as e:
        read_mapping(path, "--opt")
    assert str(e.value).startswith(f"--opt {path}: ") and "\n" not in str(e.value)


def test_empty_yaml_may_stand_for_an_empty_mapping(tmp_path):
    (tmp_path / "g.yaml").write_text("# nothing overridden\n")
    assert read_mapping(tmp_path / "g.yaml", "--gates", empty_ok=True) == {}
    with pytest.raises(EvalsuiteError, match=r"expected a \.toml file"):
        read_mapping(tmp_path / "g.yaml", "--config", suffixes=(".toml",))
