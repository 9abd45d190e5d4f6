"""Configuration files for `--config`: a flat table of option values, read from TOML or YAML, and written as
TOML (train records its resolved options in the run directory as config.toml).

Only what command-line options can hold is written: strings, numbers, booleans and lists of them, one
`key = value` per line. TOML is read with tomllib (the standard library's since Python 3.11), YAML with
PyYAML's safe loader (plain data only, no Python objects).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dist_cache.errors import UserError, first_line
from pipelines.files import replace_atomically

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the same parser, from PyPI
    import tomli as tomllib

TOML_SUFFIXES = (".toml",)
YAML_SUFFIXES = (".yaml", ".yml")


def read_config(path: str | Path) -> dict[str, Any]:
    """The file's top-level table. A file that does not parse or is not a table is a one-line UserError."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TOML_SUFFIXES + YAML_SUFFIXES:
        raise UserError(f"--config {path}: name a .toml, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config {path}: cannot read it ({first_line(err)})") from None
    try:
        if suffix in TOML_SUFFIXES:
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError: the parser says where
        raise UserError(f"--config {path}: not valid {suffix[1:].upper()} ({_parse_error(err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: must be a table of option names and values")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:  # YAML 1.1 reads a bare on, off, yes, no as a boolean, and 1 as a number
        raise UserError(f"--config {path}: the key {odd[0]!r} is not an option name; quote it")
    return data


def _parse_error(err: Exception) -> str:
    """The parser's complaint in one line, with the line it points at: tomllib puts "(at line L, column C)" in
    its message; PyYAML spreads it over several lines, with the place in a mark."""
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        problem = getattr(err, "problem", None) or first_line(err, 120)
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return first_line(err, 160)


def toml_value(value: Any) -> str:
    """One value in TOML: a basic string, an integer, a float, a boolean, or an array of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, str):
        # JSON's escapes are TOML's (\" \\ \n \t \uXXXX...), except that TOML has no surrogate pairs and wants
        # DEL escaped: keep every character but the control ones as it is.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def write_toml(path: str | Path, values: Mapping[str, Any], header: str = "") -> Path:
    """Write `values` (bare keys: letters, digits, - and _) as a flat TOML table, atomically."""
    lines = [f"# {line}" for line in header.splitlines()]
    for key, value in values.items():
        if not key or not all(c.isascii() and (c.isalnum() or c in "-_") for c in key):
            raise ValueError(f"{key!r} is not a bare TOML key")
        lines.append(f"{key} = {toml_value(value)}")
    text = "\n".join(lines) + "\n"
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
