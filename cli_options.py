"""The conventions `dist-cache`'s commands share, as click pieces: commands listed in workflow order with whole
summaries and an example each, and options under headings where a command has many; `--storage-options
JSON|@FILE`; `--config FILE` (TOML or YAML) loaded into click's default map, so options given on the command line
win; the resolved options a train run records (RUN/config.toml); one `--seed` range; old spellings that now mean
something else, refused in one line that names the new spelling.

Flags are read and written through click's own parsing (`_flag_value`), never through `Option.flag_value` or
`Option.default`, which click 8.5 leaves unset (`Sentinel.UNSET`) for a plain `is_flag` option.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# Options `train` does not record in the run's config.toml: how to run this time, or secret.
NOT_RECORDED = frozenset({"config", "resume", "storage_options"})
# Options taking a store's path or URL (no click.Path type, since a URL is no path): recorded absolute when local.
PATH_OR_URL = frozenset({"cache", "val_cache", "out"})
# Options taking a name or a local file (an open_clip tag or a checkpoint): recorded absolute when a file.
NAME_OR_FILE = frozenset({"pretrained", "model"})


class SeedType(click.ParamType):
    """`--seed`: an integer from 0 to 2^63 - 1, the range numpy's and torch's generators both take."""

    name = "integer"
    LIMIT = 2**63

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            seed = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if not 0 <= seed < self.LIMIT:
            self.fail(f"{seed} is not in 0 to 2^63-1", param, ctx)
        return seed


class Command(click.Command):
    """A command whose summary in `dist-cache --help` is its help's first line, whole (click cuts it at ~45
    characters)."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return self.short_help or (self.help or "").strip().splitlines()[0]


class GroupedOptions(Command):
    """A command whose --help lists its options under headings, in the order `option_groups` gives (click has
    no option groups of its own). An option in no group is listed last, under "Other options"."""

    def __init__(self, *args: Any, option_groups: tuple[tuple[str, tuple[str, ...]], ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.option_groups = option_groups

    def _records(self, ctx: click.Context) -> dict[str, tuple[str, str]]:
        """Each option --help shows, by parameter name (the help option's as "help", whatever click calls it)."""
        help_option = self.get_help_option(ctx)
        records = {}
        for p in self.get_params(ctx):
            record = p.get_help_record(ctx)
            if record is not None:
                records["help" if p is help_option else p.name] = record
        return records

    def ungrouped(self, ctx: click.Context) -> list[str]:
        """The names of the options --help shows that no group holds."""
        grouped = {name for _, names in self.option_groups for name in names}
        return [name for name in self._records(ctx) if name not in grouped]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = self._records(ctx)
        # One width for the option column in every group, so the groups line up as one list.
        width = min(30, max((len(r[0]) for r in records.values() if r), default=0))
        sections = [(title, [records[n] for n in names if records.get(n)]) for title, names in self.option_groups]
        sections.append(("Other options", [records[n] for n in self.ungrouped(ctx)]))
        for title, rows in sections:
            if rows:
                with formatter.section(title):
                    formatter.write_dl([(name.ljust(width), text) for name, text in rows], col_max=width)


class Workflow(click.Group):
    """The command group: commands listed in `order` (the order they are used in), not alphabetically."""

    command_class = Command

    def __init__(self, *args: Any, order: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order = order

    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(self.order)}
        return sorted(self.commands, key=lambda name: (rank.get(name, len(rank)), name))


def example(text: str) -> dict[str, str]:
    """A command's epilog: its example, kept on its own lines (\b stops click from rewrapping it)."""
    return {"epilog": f"\b\nExample:\n  {text}"}


# ---------------------------------------------------------------- --storage-options
def _json_object(ctx: click.Context, param: click.Parameter, text: str | None) -> dict[str, Any]:
    """`--storage-options`: a JSON object, or @FILE holding one (keeps credentials out of shell history)."""
    if text is None:
        return {}
    source = text
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                source = f.read()
        except OSError as err:
            raise click.BadParameter(f"cannot read {text[1:]}: {err.strerror or err}") from None
    try:
        value = json.loads(source)
    except ValueError as err:
        raise click.BadParameter(f"not JSON ({err}); e.g. '{{\"anon\": true}}' or @options.json") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


STORAGE_OPTIONS_HELP = ("fsspec options for store URLs, as JSON or @FILE: e.g. '{\"anon\": true}' (public S3), "
                        "'{\"key\": \"...\", \"secret\": \"...\", \"client_kwargs\": {\"endpoint_url\": \"...\"}}' "
                        "(S3-compatible servers), '{\"headers\": {\"Authorization\": \"...\"}}' (HTTP; also "
                        "\"retry_deadline_s\", default 20, and \"whole_object_cache_mb\", default 512, for servers "
                        "without Range support). Local paths need none.")


def storage_options_option(help: str = STORAGE_OPTIONS_HELP, name: str = "--storage-options") -> Callable:
    return click.option(name, default=None, metavar="JSON", callback=_json_object, help=help)


def check_storage_options(options: dict[str, Any], *urls: str | None, flag: str = "--storage-options") -> None:
    """Options given for stores that are all local paths would be ignored: say so instead."""
    from storage.location import is_local

    if options and all(url is None or is_local(url) for url in urls):
        raise click.UsageError(f"{flag} applies to store URLs (s3://, https://...), and every store here "
                               "is a local path")


# ---------------------------------------------------------------- --config
def _load_config(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    """`--config FILE`: its values become this command's defaults (click's default map), so options given on
    the command line win. Keys are option names, with dashes or underscores."""
    if path is None:
        return
    from dist_cache.errors import UserError
    from pipelines.config_file import read_config

    try:
        values = read_config(path)
    except UserError as err:
        raise click.BadParameter(str(err).replace(f"--config {path}: ", f"{path}: ", 1)) from None
    defaults = config_defaults(ctx.command, values, path)
    _check_config_values(ctx, defaults, path)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _config_keys(command: click.Command) -> dict[str, tuple[click.Option, str | None]]:
    """Every key a config file may use for this command: each option's spellings without dashes (the flag
    spelling of a switch, e.g. no-temporal, included) and its parameter name."""
    keys: dict[str, tuple[click.Option, str | None]] = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name != "config" and p.name is not None:
            for opt in [*p.opts, *p.secondary_opts]:
                if opt.startswith("--"):
                    keys[opt[2:]] = (p, opt)
            keys.setdefault(p.name.replace("_", "-"), (p, None))
    return keys


def _flag_value(p: click.Option, args: list[str]) -> Any:
    """The value flag `p` takes when the command line holds `args` (one of its spellings, or nothing), as click
    itself parses it: a one-option command parses them. Only public API, the same from click 8.1 to 8.5."""
    probe = click.Command("probe", params=[p], add_help_option=False)
    return probe.make_context("probe", list(args)).params[p.name]


def _opposite(p: click.Option, opt: str) -> str | None:
    """The other side of a `--x/--no-x` pair (None for a one-sided flag)."""
    if opt in p.secondary_opts:
        return p.opts[0]
    return p.secondary_opts[0] if p.secondary_opts else None


def config_defaults(command: click.Command, values: dict[str, Any], path: str) -> dict[str, Any]:
    """A config file's values as click's default map: parameter name -> the value as the command line would
    give it (text, or a flag's value), so click converts and checks it like a typed option."""
    keys = _config_keys(command)
    out: dict[str, Any] = {}
    for key, value in values.items():
        found = keys.get(key.replace("_", "-"))
        if found is None:
            raise click.BadParameter(f"{path}: unknown key {key!r}, not an option of `dist-cache {command.name}`",
                                     param_hint="--config")
        p, opt = found
        out[p.name] = _as_option_value(p, opt, value, key, path)
    return out


def _as_option_value(p: click.Option, opt: str | None, value: Any, key: str, path: str) -> Any:
    def bad(want: str) -> click.BadParameter:
        return click.BadParameter(f"{path}: {key} must be {want}, not {value!r}", param_hint="--config")

    def text(item: Any) -> str:
        if isinstance(item, (dict, list)):
            raise bad("a value, not a table or a list")
        return str(item).lower() if isinstance(item, bool) else str(item)

    if p.is_flag:
        if not isinstance(value, bool):
            raise bad("true or false")
        if opt is None:
            return value  # the parameter itself, e.g. temporal = false
        # true: as if the spelling were given; false: its other side, or, for a one-sided flag, not given.
        other = _opposite(p, opt)
        return _flag_value(p, [opt] if value else [other] if other else [])
    if isinstance(value, dict):
        return json.dumps(value)  # e.g. a storage-options table
    if p.multiple:
        items = value if isinstance(value, list) else [value]
        if p.nargs == 1:
            return [text(v) for v in items]
        if not all(isinstance(item, list) for item in items):
            raise bad(f"a list of lists of {p.nargs} values")
        return [[text(v) for v in item] for item in items]
    if p.nargs != 1:
        if not isinstance(value, list) or len(value) != p.nargs:
            raise bad(f"a list of {p.nargs} values")
        return [text(v) for v in value]
    if isinstance(value, list):
        return ",".join(text(v) for v in value)  # e.g. layers = [9, 10, 11]
    return text(value)


def _check_config_values(ctx: click.Context, defaults: dict[str, Any], path: str) -> None:
    """Convert and check every value from the file now, so a bad one is an error that names the file."""
    params = {p.name: p for p in ctx.command.params}
    for name, value in defaults.items():
        p = params[name]
        try:
            p.process_value(ctx, value)
        except click.UsageError as err:  # BadParameter included
            spelling = p.opts[0] if p.opts else name
            message = err.message if isinstance(err, click.BadParameter) else err.format_message()
            raise click.BadParameter(f"{path}: {spelling.lstrip('-')}: {message}", param_hint="--config") from None


def config_option(fn: Callable) -> Callable:
    return click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load_config, metavar="FILE",
                        help="TOML or YAML file supplying any option of this command (keys: option names, with "
                             "dashes or underscores); options on the command line win.")(fn)


def resolved_config(ctx: click.Context, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """This invocation's options as a config file holds them (option name -> value), every default resolved:
    reading it back with --config repeats the invocation. `resolved` replaces parameters whose effective value
    is computed from others (e.g. switches a recipe set). Never the secret or one-off options (NOT_RECORDED)."""
    out: dict[str, Any] = {}
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.hidden or p.name in NOT_RECORDED or p.name is None:
            continue
        value = (resolved or {}).get(p.name, ctx.params.get(p.name))
        if value is None:
            continue
        key = p.opts[0].lstrip("-")
        if p.is_flag:
            value = value == _flag_value(p, [p.opts[0]])  # the flag as given, e.g. no-temporal = true
        elif isinstance(value, tuple):
            value = _recorded_sequence(p, value)
        elif isinstance(value, str):
            value = _absolute_if_local(p, value)
        out[key] = value
    return out


def _recorded_sequence(p: click.Option, value: tuple) -> Any:
    """A multiple or many-valued option as a list; a value a callback made a tuple (--scale) as its text."""
    if p.multiple:
        return [list(v) if isinstance(v, tuple) else v for v in value]
    return list(value) if p.nargs != 1 else ",".join(map(str, value))


def _absolute_if_local(p: click.Option, value: str) -> str:
    """Local files as absolute paths, so the recorded config repeats the run from any directory; URLs, tags and
    names as given."""
    if "://" in value:
        return value
    if isinstance(p.type, click.Path) or p.name in PATH_OR_URL:
        return os.path.abspath(value)
    if p.name in NAME_OR_FILE and os.path.isfile(value):
        return os.path.abspath(value)
    return value


def record_run_config(ctx: click.Context, opts: Any, resolved: dict[str, Any] | None = None) -> None:
    """train: the run's resolved options in RUN/config.toml, written when the run starts (kept by --resume), so
    `dist-cache train --config RUN/config.toml --out NEW` repeats the run."""
    from pipelines.config_file import write_toml
    from pipelines.files import write_failure

    path = Path(opts.out) / "config.toml"
    if opts.resume and path.exists():
        return
    try:
        write_toml(path, resolved_config(ctx, resolved),
                   header="dist-cache train: this run's options, every default resolved (not --storage-options).\n"
                          "Repeat the run with: dist-cache train --config config.toml --out NEW_RUN")
    except OSError as err:  # a full disk (train's preflight has checked that the directory takes files)
        raise write_failure(path, err) from None


def moved_option(old: str, new: str) -> Callable:
    """An old spelling that now means something else, or nothing: hidden, and given (on the command line or in a
    config file) a one-line usage error naming the new spelling, never silently taken for another option."""

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            raise click.UsageError(f"{old} is now {new}")

    return click.option(old, default=None, hidden=True, expose_value=False, callback=refuse, help=f"Now {new}.")


def seed_option(help: str) -> Callable:
    """`--seed`, the same range in every command that takes one."""
    return click.option("--seed", default=0, type=SeedType(), show_default=True, help=f"{help} 0 to 2^63-1.")
