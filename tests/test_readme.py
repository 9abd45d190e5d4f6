"""The README's two commands are the project's contract with a new user and with CI: keep them true."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The indented command lines of the README, in order."""
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.strip() for line in lines if line.startswith("    python3 -m venv")]


def test_readme_starts_with_the_demo_and_the_test_command():
    demo, tests = readme_commands()[:2]
    assert demo.endswith("dist-cache demo")
    assert "pytest" in tests and '".[test]"' in tests
    assert tests.index("ruff check") < tests.index("pytest")  # lint findings fail CI before the long test run


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_commands()[1] in ci_lines
