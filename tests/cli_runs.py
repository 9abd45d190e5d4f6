"""The CLI run in-process, as the store tests call it, and the one-line error a refusal must be."""

from __future__ import annotations

from click.testing import CliRunner, Result

import cli


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]
