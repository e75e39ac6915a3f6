"""Parse Celery and Flower command lines with the installed Celery's own parsers, as JSON.

``python -m celery_fleet.cli_report`` reads a JSON list of ``{"command": "worker" | "beat" |
"flower", "args": [...]}`` on stdin and prints ONE JSON object: ``parsed``, aligned with the
input, each ``{"set": [...], "extra": [...], "error": null | "one line"}``; ``envvars``, every
environment variable the ``celery`` command line reads for itself and its worker and beat
subcommands; and ``flower_envvars``, those ``celery flower`` reads for its options. The
preflight runs it in the throwaway virtualenv of the wheelhouse, so the rules are those of
the Celery, click and Flower the hosts will run.

Only the tokenizers run: no type conversion and no callbacks, which would need an app.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import sys
from collections.abc import Iterable, Sequence
from importlib.metadata import entry_points
from typing import Any, TypedDict

# celery.bin.celery.main() runs the group with auto_envvar_prefix="CELERY".
AUTO_ENVVAR_PREFIX = "CELERY"
CLICK_COMMANDS = ("worker", "beat")
COMMANDS = (*CLICK_COMMANDS, "flower")
# flower.command.apply_env_options reads FLOWER_<OPTION> for every option it defines.
FLOWER_ENVVAR_PREFIX = "FLOWER_"
FLOWER_MISSING = "flower is not installed in the wheelhouse"


class Parsed(TypedDict):
    set: list[str]
    extra: list[str]
    error: str | None


def parsed(names: Iterable[str] = (), extra: Iterable[str] = (), error: str | None = None) -> Parsed:
    return {"set": list(dict.fromkeys(names)), "extra": list(extra), "error": error}


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def celery_context() -> Any:
    """The ``celery`` group's click context, as ``celery`` (its main()) starts it."""
    import click  # noqa: PLC0415 -- the wheelhouse's click, imported only when asked
    from celery.bin.celery import celery  # noqa: PLC0415

    return click.Context(celery, info_name="celery", auto_envvar_prefix=AUTO_ENVVAR_PREFIX)


def sub_context(parent: Any, command: Any, name: str) -> Any:
    """The context click gives ``command`` under ``parent``, without parsing anything."""
    return command.context_class(command, parent=parent, info_name=name, **command.context_settings)


def click_parse(command: Any, ctx: Any, args: Sequence[str]) -> tuple[list[str], dict[str, Any], list[str]]:
    """Option names set (in order, repeated), the parser's values, leftovers; click.UsageError if refused."""
    import click  # noqa: PLC0415

    # make_parser/parse_args is the tokenizer alone; Command.parse_args would also convert
    # values and run callbacks, which read the app.
    values, leftovers, order = command.make_parser(ctx).parse_args(args=list(args))
    if leftovers and not ctx.allow_extra_args:
        raise click.UsageError(f"Got unexpected extra arguments ({' '.join(leftovers)})", ctx)
    names = [p.name for p in order if isinstance(p, click.Option) and p.name]
    return names, values, leftovers


def parse_celery(group_ctx: Any, name: str, args: Sequence[str]) -> Parsed:
    """``celery worker|beat ARGS``: options set, and the leftovers celery gives config_from_cmdline."""
    import click  # noqa: PLC0415

    command = group_ctx.command.get_command(group_ctx, name)
    try:
        names, _, leftovers = click_parse(command, sub_context(group_ctx, command, name), args)
    except click.UsageError as exc:
        return parsed(error=one_line(exc.format_message()))
    return parsed(names, leftovers)


def flower_command() -> Any:
    """The click command ``celery flower`` runs, found as Celery finds it: by entry point."""
    for entry in entry_points(group="celery.commands", name="flower"):
        return entry.load()
    raise ImportError(FLOWER_MISSING)


def tornado_parser(source: Any, seen: list[str]) -> Any:
    """A fresh tornado OptionParser with copies of ``source``'s options, recording each one parsed."""
    from tornado.options import OptionParser  # noqa: PLC0415

    parser = OptionParser()
    for key, option in source._options.items():  # tornado has no public copy; flower reads it too
        clone = copy.copy(option)
        # tornado runs an option's callback whenever it parses it: record the name instead,
        # so --help neither prints nor exits and the global options stay untouched.
        clone.callback = lambda _value, name=option.name: seen.append(name.replace("-", "_"))
        parser._options[key] = clone
    return parser


def parse_flower(group_ctx: Any, args: Sequence[str]) -> Parsed:
    """``celery flower ARGS`` as flower 2.x reads them: click, then flower's filter, then tornado."""
    import click  # noqa: PLC0415

    try:
        command = flower_command()
        from flower.command import is_flower_option  # noqa: PLC0415
        from flower.options import default_options  # noqa: PLC0415
    except ImportError as exc:
        missing = importlib.util.find_spec("flower") is None
        return parsed(error=FLOWER_MISSING if missing else one_line(f"{type(exc).__name__}: {exc}"))
    # click first: flower's command takes --help itself and hands the rest on as tornado_argv.
    try:
        names, values, _ = click_parse(command, sub_context(group_ctx, command, "flower"), args)
    except click.UsageError as exc:
        return parsed(error=one_line(exc.format_message()))
    argv = [a for p in command.params if isinstance(p, click.Argument) for a in as_args(values.get(p.name))]
    # flower.command.apply_options silently drops every argument that names no option.
    kept = [a for a in argv if is_flower_option(a)]
    dropped = [a for a in argv if not is_flower_option(a)]
    seen: list[str] = []
    parser = tornado_parser(default_options, seen)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # tornado prints its help on an unknown option
            remaining = parser.parse_command_line(["flower", *kept], final=False)
    except Exception as exc:  # tornado.options.Error, or the option's type refusing the value
        return parsed(error=one_line(exc))
    return parsed([*names, *seen], [*dropped, *remaining])


def as_args(value: Any) -> list[str]:
    """A nargs=-1 argument's value; click leaves a sentinel when nothing was given."""
    return [str(v) for v in value] if isinstance(value, tuple | list) else []


def parse_one(group_ctx: Any, entry: dict[str, Any]) -> Parsed:
    command, args = entry.get("command"), entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        return parsed(error=f"args of {command!r} is not a list of strings")
    if command in CLICK_COMMANDS:
        return parse_celery(group_ctx, str(command), args)
    if command == "flower":
        return parse_flower(group_ctx, args)
    return parsed(error=f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")


def param_envvars(param: Any, ctx: Any) -> list[str]:
    """The variables click consults for ``param``: its own envvar, then the automatic one."""
    import click  # noqa: PLC0415

    own = param.envvar
    names = [own] if isinstance(own, str) else list(own or ())
    # click.Option.resolve_envvar_value: f"{ctx.auto_envvar_prefix}_{self.name.upper()}".
    if isinstance(param, click.Option) and param.allow_from_autoenv and ctx.auto_envvar_prefix and param.name:
        names.append(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
    return names


def celery_envvars(group_ctx: Any) -> list[str]:
    """Every variable ``celery``, ``celery worker`` and ``celery beat`` read, from the click tree."""
    group = group_ctx.command
    contexts = [group_ctx]
    for name in CLICK_COMMANDS:
        contexts.append(sub_context(group_ctx, group.get_command(group_ctx, name), name))
    return sorted({v for ctx in contexts for p in ctx.command.get_params(ctx) for v in param_envvars(p, ctx)})


def flower_envvars() -> list[str]:
    try:
        from flower.options import default_options  # noqa: PLC0415
    except ImportError:
        return []
    names = (option.name.replace("-", "_").upper() for option in default_options._options.values())
    return sorted(FLOWER_ENVVAR_PREFIX + name for name in names)


def report(arguments: Sequence[dict[str, Any]]) -> dict[str, Any]:
    group_ctx = celery_context()
    return {
        "parsed": [parse_one(group_ctx, entry) for entry in arguments],
        "envvars": celery_envvars(group_ctx),
        "flower_envvars": flower_envvars(),
    }


def read_arguments(text: str) -> list[dict[str, Any]]:
    data = json.loads(text or "[]")
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ValueError("expected a JSON list of {command, args} objects")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    try:
        arguments = read_arguments(sys.stdin.read())
        # stdout carries only the JSON object, whatever the imports print.
        with contextlib.redirect_stdout(sys.stderr):
            data = report(arguments)
    except Exception as exc:
        sys.stderr.write(f"celery-fleet-cli-report: {one_line(f'{type(exc).__name__}: {exc}')}\n")
        return 1
    json.dump(data, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
