"""The console entry point as a user meets it: every mistake is one line on stderr and exit status 2; the help
explains every command and option; config files supply options and never beat the command line."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import cli


def dist_cache(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, says",
    [
        (["extract", "--manifest", "m.csv", "--video-root", ".", "--out", "o.zarr", "--frames", "0"], "--frames"),
        (["extract", "--manifest", "m.csv", "--video-root", ".", "--out", "o.zarr", "--scale", "0.5"], "--scale"),
        (["train", "--cache", "c.zarr", "--video-root", ".", "--out", "run", "--gamma", "3"], "--gamma"),
        (["extract", "--no-such-flag"], "--no-such-flag"),
        (["no-such-command"], "no-such-command"),
        (["info", "/nonexistent/store.zarr"], "no dist-cache store"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(args, says):
    result = dist_cache(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_help_and_version_exit_0():
    assert dist_cache("--help").returncode == 0 and "extract" in dist_cache("--help").stdout
    version = dist_cache("--version")
    assert version.returncode == 0 and "version" in version.stdout


def test_commands_are_listed_in_workflow_order_with_whole_summaries():
    listing = dist_cache("--help").stdout
    section = listing[listing.index("Commands:"):]
    lines = section.splitlines()[1:]
    found = [line.split()[0] for line in lines if line.startswith("  ") and not line.startswith("   ")]
    assert found == list(cli.COMMAND_ORDER) == list(cli.main.list_commands(click.Context(cli.main)))
    flat = " ".join(section.split())  # the listing wraps long summaries over lines, it never cuts them
    for name in cli.COMMAND_ORDER:
        summary = cli.main.commands[name].help.strip().splitlines()[0]
        assert " ".join(summary.split()) in flat, name
    assert "..." not in section


@pytest.mark.parametrize("name", cli.COMMAND_ORDER)
def test_every_option_has_help_and_every_command_ends_with_an_example(name):
    command = cli.main.commands[name]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help and param.help.strip(), f"dist-cache {name} {param.opts[0]} has no help text"
    text = dist_cache(name, "--help")
    assert text.returncode == 0 and "Traceback" not in text.stderr
    tail = text.stdout.rstrip().splitlines()
    assert tail[-2].strip() == "Example:" and tail[-1].strip().startswith(f"dist-cache {name} "), text.stdout


def test_dask_workers_keeps_its_old_spelling_hidden():
    extract = cli.main.commands["extract"]
    assert "--dask-workers" in extract.get_help(click.Context(extract))
    assert "--workers" not in extract.get_help(click.Context(extract)).replace("--dask-workers", "")
    both = CliRunner().invoke(cli.main, ["extract", "--manifest", "m.csv", "--video-root", ".", "--out", "o.zarr",
                                         "--workers", "2", "--dask-workers", "2"])
    assert both.exit_code == 2 and "old spelling" in both.output
    # train's and eval's --workers were DataLoader processes: now --decode-workers, the old spelling hidden.
    for name, required in (("train", ["--cache", "c.zarr", "--out", "r"]),
                           ("eval", ["--checkpoint", "x.pt", "--cache", "c.zarr"])):
        command = cli.main.commands[name]
        text = command.get_help(click.Context(command))
        assert "--decode-workers" in text and "--workers" not in text.replace("--decode-workers", "")
        both = CliRunner().invoke(cli.main, [name, *required, "--workers", "0", "--decode-workers", "1"])
        assert both.exit_code == 2, both.output
        assert "--decode-workers and its old spelling were both given" in both.output


# ------------------------------------------------------------------ --config


@pytest.fixture
def extract_config(tmp_path):
    """An extract command that stops at its first check (the video root), after reading all its options."""
    (tmp_path / "m.csv").write_text("path,label\na.mp4,x\n")

    def run(text: str, suffix: str, *args: str) -> click.testing.Result:
        path = tmp_path / f"c{suffix}"
        path.write_text(text)
        return CliRunner().invoke(cli.main, ["extract", "--config", str(path), *args])

    return run


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'manifest = "M"\nvideo_root = "/no/such/root"\nout = "O"\nframes = 2\ntemplate = ["a {}", "b {}"]\n'),
    (".yaml", "manifest: M\nvideo-root: /no/such/root\nout: O\nframes: 2\ntemplate: ['a {}', 'b {}']\n"),
])
def test_a_config_file_supplies_required_options(extract_config, tmp_path, suffix, text):
    result = extract_config(text.replace("M", str(tmp_path / "m.csv")).replace("O", str(tmp_path / "o.zarr")), suffix)
    # Every option came from the file: the run gets as far as the video root it names.
    assert result.exit_code == 2 and "--video-root /no/such/root" in result.output, result.output


def parsed(command: str, *args: str) -> click.Context:
    """The command's options as click resolves them (config file, defaults, command line), without running it."""
    return cli.main.commands[command].make_context(command, list(args), parent=click.Context(cli.main))


def test_the_command_line_beats_the_config_file(tmp_path):
    from click.core import ParameterSource

    (tmp_path / "t.toml").write_text('cache = "c.zarr"\nvideo-root = "v"\nout = "r"\ngamma = 4\nno-temporal = true\n'
                                     "beta_dim = 64\nlayers = [9, 10, 11]\n")
    ctx = parsed("train", "--config", str(tmp_path / "t.toml"), "--gamma", "8")
    assert ctx.params["gamma"] == 8 and ctx.get_parameter_source("gamma") == ParameterSource.COMMANDLINE
    assert ctx.params["beta_dim"] == 64 and ctx.get_parameter_source("beta_dim") == ParameterSource.DEFAULT_MAP
    assert ctx.params["temporal"] is False and ctx.params["layers"] == "9,10,11" and ctx.params["out"] == "r"
    assert ctx.params["alpha_dim"] == 384 and ctx.get_parameter_source("alpha_dim") == ParameterSource.DEFAULT
    # eval takes one too (YAML here).
    (tmp_path / "e.yaml").write_text("checkpoint: runs/x/best.pt\ncache: val.zarr\nbatch-size: 4\n")
    ctx = parsed("eval", "--config", str(tmp_path / "e.yaml"), "--batch-size", "8")
    assert (ctx.params["checkpoint"], ctx.params["cache"], ctx.params["batch_size"]) == \
        ("runs/x/best.pt", "val.zarr", 8)


@pytest.mark.parametrize("text, says", [
    ("epochs = 2\nno_such_option = 1\n", "unknown key 'no_such_option'"),
    ("epochs = [", "not valid TOML"),
    ("online = 3\n", "online must be true or false"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, says):
    (tmp_path / "c.toml").write_text(text)
    result = dist_cache("train", "--config", str(tmp_path / "c.toml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr


def test_config_values_round_trip_through_the_toml_writer(tmp_path):
    from pipelines.config_file import read_config, write_toml

    values = {"a": "quote \" back\\slash\nnew line é \x7f \U0001f600", "b": 3, "c": 1e-05, "d": 3.2e-4, "e": True,
              "f": ["x", "y"], "g": float("inf"), "with-dash": 0.1}
    write_toml(tmp_path / "v.toml", values, header="a header\nof two lines")
    assert read_config(tmp_path / "v.toml") == values
