"""The conventions `dist-cache`'s commands share, as click pieces: commands listed in workflow order with whole
summaries and an example each; `--storage-options JSON|@FILE`; `--config FILE` (TOML or YAML) loaded into
click's default map, so options given on the command line win; the resolved options a train run records
(RUN/config.toml); old option spellings kept as hidden aliases.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

# Options `train` does not record in the run's config.toml: how to run this time, or secret.
NOT_RECORDED = frozenset({"config", "resume", "storage_options"})


class Command(click.Command):
    """A command whose summary in `dist-cache --help` is its help's first line, whole (click cuts it at ~45
    characters)."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return self.short_help or (self.help or "").strip().splitlines()[0]


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
                        "(S3-compatible servers), '{\"headers\": {\"Authorization\": \"...\"}}' (HTTP). "
                        "Local paths need none.")


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
        raise click.BadParameter(str(err).removeprefix(f"--config {path}: ")) from None
    ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx.command, values, path)}


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

    if p.is_flag:
        if not isinstance(value, bool):
            raise bad("true or false")
        if opt is None:
            return value  # the parameter itself, e.g. temporal = false
        if opt in p.secondary_opts:
            return not value
        return p.flag_value if value else p.default
    if isinstance(value, dict):
        return json.dumps(value)  # e.g. a storage-options table
    if p.multiple:
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (dict, list)) for v in items):
            raise bad("a list of values")
        return [str(v) for v in items]
    if isinstance(value, list):
        return ",".join(str(v) for v in value)  # e.g. layers = [9, 10, 11]
    return str(value).lower() if isinstance(value, bool) else str(value)


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
            value = value == p.flag_value  # the flag as given, e.g. no-temporal = true
        elif isinstance(value, tuple):
            value = list(value) if p.multiple else ",".join(map(str, value))
        out[key] = value
    return out


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


def renamed_option(old: str, new: str, type: Any = None) -> Callable:
    """The old spelling `old` of option `new` (its parameter name), kept working but hidden from --help."""
    return click.option(old, f"{new}_old_spelling", default=None, hidden=True, type=type,
                        help=f"Old spelling of --{new.replace('_', '-')}.")


def merge_renamed(kw: dict[str, Any], new: str) -> None:
    """Fold the old spelling's value (renamed_option) into the new parameter; both given is a usage error."""
    old = kw.pop(f"{new}_old_spelling")
    if old is None:
        return
    ctx = click.get_current_context()
    if ctx.get_parameter_source(new) not in (ParameterSource.DEFAULT, None):
        raise click.UsageError(f"--{new.replace('_', '-')} and its old spelling were both given; keep one")
    kw[new] = old


