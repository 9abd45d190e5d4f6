"""The console entry point as a user meets it: every mistake is one line on stderr and exit status 2; the help
explains every command and option; config files supply options and never beat the command line."""

from __future__ import annotations

import re
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
        assert summary.endswith("."), f"{name}'s summary is not a whole sentence: {summary!r}"
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


# Old spellings that now mean something else, or nothing: each a one-line error naming the new spelling.
MOVED = [
    (["extract", "--manifest", "m.csv", "--video-root", ".", "--out", "o.zarr", "--workers", "2"],
     "--workers is now --dask-workers"),
    (["train", "--cache", "c.zarr", "--out", "r", "--workers", "0"], "--workers is now --decode-workers"),
    (["eval", "--checkpoint", "x.pt", "--cache", "c.zarr", "--workers", "0"], "--workers is now --decode-workers"),
    (["eval", "--checkpoint", "x.pt", "--cache", "c.zarr", "--json", "r.json"], "--json is now --report FILE"),
    (["eval", "--checkpoint", "x.pt", "--cache", "c.zarr", "--classes", "c.txt"],
     "--classes is now --zero-shot-classes"),
    (["copy", "a.zarr", "b.zarr", "--frames", "drop"], "--frames is now --drop-dense-frames"),
]


@pytest.mark.parametrize("args, says", MOVED)
def test_moved_spellings_are_one_line_errors_naming_the_new_one(args, says):
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2 and says in result.output, result.output
    old = says.split()[0]
    command = cli.main.commands[args[0]]
    # The old spelling, as a whole option name (not a prefix of another: --frames-format, --json-...), is not offered.
    assert not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", command.get_help(click.Context(command)))


def test_a_moved_spelling_in_a_config_file_names_the_file(tmp_path):
    (tmp_path / "c.toml").write_text('cache = "c.zarr"\nout = "r"\nworkers = 0\n')
    result = dist_cache("train", "--config", str(tmp_path / "c.toml"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert str(tmp_path / "c.toml") in result.stderr and "--workers is now --decode-workers" in result.stderr


SEEDED = {"extract": ["--manifest", "m.csv", "--video-root", ".", "--out", "o.zarr"],
          "train": ["--cache", "c.zarr", "--out", "r"], "verify": ["s.zarr"], "demo": []}


@pytest.mark.parametrize("name", sorted(SEEDED))
@pytest.mark.parametrize("seed", ["-1", str(2**63), "x"])
def test_every_seed_has_one_range(name, seed, tmp_path):
    """One definition: a seed out of 0..2^63-1 is the same usage error in every command, before anything runs."""
    from cli_options import SeedType

    has_seed = sorted(n for n, c in cli.main.commands.items() if any(p.name == "seed" for p in c.params))
    assert has_seed == sorted(SEEDED)
    [param] = [p for p in cli.main.commands[name].params if p.name == "seed"]
    assert isinstance(param.type, SeedType) and "0 to 2^63-1" in param.help
    result = CliRunner().invoke(cli.main, [name, *SEEDED[name], "--seed", seed])
    assert result.exit_code == 2 and "--seed" in result.output, result.output


def test_extract_help_groups_its_options():
    extract = cli.main.commands["extract"]
    ctx = click.Context(extract)
    assert extract.ungrouped(ctx) == [], "put these extract options into a group of cli.EXTRACT_GROUPS"
    text = extract.get_help(ctx)
    titles = [title for title, _ in cli.EXTRACT_GROUPS]
    assert titles == ["Input", "Model", "Sampling", "Storage", "Run"]
    positions = [text.index(f"\n{title}:\n") for title in titles]
    assert positions == sorted(positions) and "Other options" not in text
    # The manifest's companions stand right after it.
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    at = options.index("--manifest")
    assert options[at + 1: at + 3] == ["--classes", "--manifest-format"]


def test_decode_workers_reads_alike_in_every_command():
    for name in ("extract", "train", "eval"):
        [param] = [p for p in cli.main.commands[name].params if p.name == "decode_workers"]
        assert param.callback is cli._count_or_auto and "0" in param.help, name
    ctx = parsed("extract", "--manifest", "m.csv", "--video-root", ".", "--out", "o", "--decode-workers", "0")
    assert ctx.params["decode_workers"] == 0


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


# ------------------------------------------------------------------ --config: every kind of option, both ways


@click.command()
@cli.config_option
@click.option("--flag", is_flag=True, help="a plain flag, off by default")
@click.option("--on/--off", default=True, help="a pair, on by default")
@click.option("--no-thing", "thing", flag_value=False, default=True, help="a one-sided switch-off")
@click.option("--level", count=True, help="a count")
@click.option("--tag", multiple=True, help="repeatable")
@click.option("--mode", type=click.Choice(["a", "b"]), default="a", help="a choice")
@click.option("--pick", multiple=True, type=click.Choice(["x", "y"]), help="repeatable choices")
@click.option("--path", type=click.Path(), default=None, help="a local path")
@click.option("--size", nargs=2, type=int, default=None, help="two values")
@click.option("--box", nargs=2, type=int, multiple=True, help="repeatable pairs")
@click.option("--ratio", type=float, default=0.5, help="a number")
def kinds(**kw: object) -> None:
    """Every kind of option click has."""


KIND_ARGS = [
    [],
    ["--flag", "--off", "--no-thing", "--level", "--level", "--tag", "p", "--tag", "q r", "--mode", "b", "--pick",
     "y", "--pick", "x", "--path", "rel/file.txt", "--size", "3", "4", "--box", "1", "2", "--box", "5", "6",
     "--ratio", "0.25"],
    ["--on", "--tag", "only"],
]


def round_trip(command: click.Command, args: list[str], path) -> tuple[dict, dict]:
    """The options as parsed from `args`, and as parsed back from the config file they were recorded in."""
    from cli_options import resolved_config
    from pipelines.config_file import write_toml

    ctx = command.make_context(command.name, list(args))
    recorded = resolved_config(ctx)
    if path.suffix == ".toml":
        write_toml(path, recorded)
    else:
        import yaml

        path.write_text(yaml.safe_dump(recorded))
    return ctx.params, command.make_context(command.name, ["--config", str(path)]).params


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
@pytest.mark.parametrize("args", KIND_ARGS)
def test_every_kind_of_option_round_trips_through_a_config_file(tmp_path, monkeypatch, args, suffix):
    """Flags (plain, pairs, one-sided switch-offs), counts, multiples, choices, paths and pairs of values: the
    recorded file gives back the same options (click 8.5 keeps a plain flag's value as Sentinel.UNSET, which once
    read every `flag = true` as false)."""
    import os

    monkeypatch.chdir(tmp_path)
    given, again = round_trip(kinds, args, tmp_path / f"c{suffix}")
    if given["path"] is not None:
        given["path"] = os.path.abspath(given["path"])  # recorded absolute: the file repeats from anywhere
    assert again == given


def test_true_flags_in_a_config_file_are_read_as_true(tmp_path):
    (tmp_path / "c.toml").write_text("flag = true\noff = true\nno-thing = true\nlevel = 3\n")
    ctx = kinds.make_context("kinds", ["--config", str(tmp_path / "c.toml")])
    assert (ctx.params["flag"], ctx.params["on"], ctx.params["thing"], ctx.params["level"]) == (True, False, False, 3)
    (tmp_path / "c.yaml").write_text("flag: false\n'on': false\nthing: true\n")
    ctx = kinds.make_context("kinds", ["--config", str(tmp_path / "c.yaml")])
    assert (ctx.params["flag"], ctx.params["on"], ctx.params["thing"]) == (False, False, True)


@pytest.mark.parametrize("command, args", [
    ("train", ["--cache", "rel/train.zarr", "--video-root", "videos", "--out", "runs/r", "--online", "--reaugment",
               "--pretrained", "weights.pt", "--no-temporal", "--report-to", "tensorboard", "--report-to", "wandb",
               "--layers", "9,10,11", "--decode-workers", "0", "--seed", "7"]),
    ("extract", ["--manifest", "m.csv", "--video-root", "v", "--out", "s3://bucket/s.zarr", "--dense-frames",
                 "--hash-videos", "--retry-failed", "--template", "a {}", "--template", "b {}", "--scale", "0.5,1.0",
                 "--model", "dist-tiny", "--pretrained", "openai"]),
])
@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_the_commands_options_round_trip_with_absolute_local_paths(tmp_path, monkeypatch, command, args, suffix):
    import os

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"")
    given, again = round_trip(cli.main.commands[command], args, tmp_path / f"c{suffix}")
    for name in ("cache", "video_root", "out", "manifest", "pretrained"):
        if name in given and given[name] and "://" not in given[name] and given[name] not in ("openai",):
            given[name] = os.path.abspath(given[name])
    assert again == given
    if command == "train":
        assert again["online"] is again["reaugment"] is True and again["temporal"] is False
    else:
        assert again["dense_frames"] is again["hash_videos"] is again["retry_failed"] is True
        assert again["out"] == "s3://bucket/s.zarr" and again["pretrained"] == "openai"


@pytest.mark.parametrize("name, text, says", [
    ("c.yaml", "epochs: 2\nlayers: [9, 10\n", "line 3, column 1"),
    ("c.toml", "epochs = 2\nlayers = [9, 10\nlr = 1\n", "line 3, column 1"),
    ("c.toml", 'epochs = "many"\n', "epochs: 'many' is not a valid integer range"),
    ("c.toml", 'decode-workers = "some"\n', "decode-workers: 'some' is neither a count nor auto"),
    ("c.yaml", "on: true\n", "the key True is not an option name; quote it"),
])
def test_config_errors_name_the_file_and_the_line(tmp_path, name, text, says):
    (tmp_path / name).write_text(text)
    result = dist_cache("train", "--config", str(tmp_path / name))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert str(tmp_path / name) in result.stderr and says in result.stderr, result.stderr
