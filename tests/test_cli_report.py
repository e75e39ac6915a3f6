"""celery_fleet.cli_report: command lines read by Celery's, click's and Flower's own parsers.

The cases are generated from the parsers themselves: every spelling of every option of
`celery worker` and `celery beat`, in every form click's tokenizer accepts, and every option
Flower defines. Celery and click are the project venv's; Flower and tornado are too when it has
them, else they come from the deploy's own wheelhouse.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from conftest import ROOT, build_wheelhouse
from test_app_report import write_probe

from celery_fleet import cli_report

GROUP_CTX = cli_report.celery_context()


def command_context(name: str) -> tuple[click.Command, click.Context]:
    command = GROUP_CTX.command.get_command(GROUP_CTX, name)
    return command, cli_report.sub_context(GROUP_CTX, command, name)


def options_of(name: str) -> list[click.Option]:
    command, ctx = command_context(name)
    return [p for p in command.get_params(ctx) if isinstance(p, click.Option)]


def is_short(opt: str) -> bool:
    return len(opt) == 2 and opt[0] == "-" and opt[1] != "-"


def spellings(option: click.Option) -> list[str]:
    return [*option.opts, *option.secondary_opts]


def forms(option: click.Option, opt: str) -> list[list[str]]:
    """Every way click's tokenizer takes ``opt`` with its value, if any."""
    if option.is_flag or option.count:
        return [[opt]]
    assert option.nargs == 1, f"{option.name} takes {option.nargs} values; add its forms here"
    if is_short(opt):
        return [[f"{opt}v"], [opt, "v"]]
    return [[f"{opt}=v"], [opt, "v"]]


def click_cases(name: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """(command, args, the names ``set`` must be) for every option of ``celery <name>``."""
    options = options_of(name)
    short_flags = [(o, s) for o in options if o.is_flag for s in spellings(o) if is_short(s)]
    for option in options:
        for opt in spellings(option):
            for args in forms(option, opt):
                yield name, args, [option.name]
            if not is_short(opt):
                continue
            # A short option after a short flag in one token: -E + -B is -EB, -E + -Q a is -EQa.
            for flag, flag_opt in short_flags:
                if flag is option:
                    continue
                value = "" if option.is_flag else "v"
                yield name, [f"{flag_opt}{opt[1]}{value}"], [flag.name, option.name]


CLICK_CASES = [case for name in cli_report.CLICK_COMMANDS for case in click_cases(name)]


def test_the_cases_cover_every_option_and_the_combined_forms():
    for name in cli_report.CLICK_COMMANDS:
        covered = {n for command, _, names in CLICK_CASES if command == name for n in names}
        assert covered == {o.name for o in options_of(name)}
    assert ("worker", ["-EB"], ["task_events", "beat"]) in CLICK_CASES
    assert ("worker", ["-EQv"], ["task_events", "queues"]) in CLICK_CASES


@pytest.mark.parametrize(("command", "args", "names"), CLICK_CASES, ids=lambda v: " ".join(v) if v else "-")
def test_every_spelling_of_every_option_sets_exactly_that_option(command, args, names):
    assert cli_report.parse_one(GROUP_CTX, {"command": command, "args": args}) == {
        "set": names,
        "extra": [],
        "error": None,
    }


def test_options_come_once_in_first_seen_order_and_leftovers_verbatim():
    args = ["-n", "a@%h", "-B", "--hostname=b@%h", "-Qa,b", "task_default_queue=x", "--", "-E", "y"]
    assert cli_report.parse_one(GROUP_CTX, {"command": "worker", "args": args}) == {
        "set": ["hostname", "beat", "queues"],
        "extra": ["task_default_queue=x", "-E", "y"],  # after --, options are leftovers too
        "error": None,
    }
    beat = ["--no-enable-remote-control", "-S", "x", "--enable-remote-control", "beat_max_loop_interval=5"]
    assert cli_report.parse_one(GROUP_CTX, {"command": "beat", "args": beat}) == {
        "set": ["remote_control", "scheduler"],
        "extra": ["beat_max_loop_interval=5"],
        "error": None,
    }


@pytest.mark.parametrize(
    ("command", "args", "fragment"),
    [
        ("worker", ["-A", "proj"], "No such option '-A'"),  # the group's option, not the worker's
        ("worker", ["--app=proj"], "No such option '--app'"),
        ("worker", ["-Q"], "Option '-Q' requires an argument"),
        ("worker", ["--beat=yes"], "Option '--beat' does not take a value"),
        ("worker", ["-EZ"], "No such option '-Z'"),
        ("worker", ["--que=a"], "No such option '--que'"),  # no prefix matching
        ("beat", ["--queues=a"], "No such option '--queues'"),
        ("beat", ["-B"], "No such option '-B'"),
        ("worker", "-B", "args of 'worker' is not a list of strings"),
        ("celery", [], "unknown command 'celery'"),
    ],
)
def test_what_the_parser_refuses_is_one_line(command, args, fragment):
    result = cli_report.parse_one(GROUP_CTX, {"command": command, "args": args})
    assert result["set"] == result["extra"] == []
    assert fragment in result["error"]
    assert "\n" not in result["error"]


# Environment variables: what click itself consults, for every parameter of the tree.


class RecordingEnviron(dict):
    """An os.environ that records every name looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def contexts() -> list[click.Context]:
    return [GROUP_CTX, *(command_context(name)[1] for name in cli_report.CLICK_COMMANDS)]


def test_envvars_are_what_click_reads_for_every_parameter(monkeypatch):
    params = [(ctx, p) for ctx in contexts() for p in ctx.command.get_params(ctx)]
    environ = RecordingEnviron()
    monkeypatch.setattr(os, "environ", environ)
    for ctx, param in params:
        param.resolve_envvar_value(ctx)
    monkeypatch.undo()
    assert cli_report.celery_envvars(GROUP_CTX) == sorted(environ.read)


def test_each_envvar_sets_its_parameter(monkeypatch):
    """Each name, alone in the environment, is what click hands to some parameter."""
    envvars = cli_report.celery_envvars(GROUP_CTX)
    params = [(ctx, p) for ctx in contexts() for p in ctx.command.get_params(ctx)]
    for name in envvars:
        monkeypatch.setattr(os, "environ", {name: "from-env"})
        hits = [(ctx.info_name, p.name) for ctx, p in params if p.resolve_envvar_value(ctx) == "from-env"]
        assert len(hits) == 1, (name, hits)
    monkeypatch.undo()
    # The ones preflight must refuse, and the group's own envvars.
    for name in ("CELERY_WORKER_BEAT", "CELERY_WORKER_QUEUES", "CELERY_APP", "APP", "BROKER_URL"):
        assert name in envvars
    source = inspect.getsource(cli_report)
    assert not [name for name in envvars if f'"{name}"' in source or f"'{name}'" in source]


def test_envvars_reach_the_worker_as_its_options(monkeypatch):
    """The automatic names really set the options, as `celery worker` resolves them with an app."""
    from celery import Celery  # noqa: PLC0415
    from celery.bin.base import CLIContext  # noqa: PLC0415

    app = Celery("envvars", broker="memory://")
    parent = click.Context(
        GROUP_CTX.command,
        info_name="celery",
        auto_envvar_prefix=cli_report.AUTO_ENVVAR_PREFIX,
        obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True),
    )
    command, _ = command_context("worker")
    env = {"CELERY_WORKER_QUEUES": "a,b", "CELERY_WORKER_HOSTNAME": "x@h", "CELERY_WORKER_PURGE": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    params = command.make_context("worker", [], parent=parent).params
    assert (params["queues"], params["hostname"], params["purge"]) == (["a", "b"], "x@h", True)
    # click reads CELERY_WORKER_BEAT too. (click 8.5.1 maps a truthy value of this non-bool flag,
    # whose type is celery's CELERY_BEAT, to "unset", so it starts no beat today; preflight
    # refuses the name all the same.)
    [beat] = [p for p in command.params if p.name == "beat"]
    monkeypatch.setenv("CELERY_WORKER_BEAT", "1")
    assert beat.resolve_envvar_value(command_context("worker")[1]) == "1"


# Flower, with a fresh tornado parser carrying copies of Flower's options.


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """Flower importable: the venv's, else installed from the deploy's wheelhouse into a directory."""
    if importlib.util.find_spec("flower") is not None:
        yield None
        return
    work = tmp_path_factory.mktemp("flower")
    # The same inputs as test_app_report's wheelhouse, so both find it in .cache by its digest.
    sources = [ROOT / "examples" / "demo_app", write_probe(work / "probe"), ROOT]
    archive = build_wheelhouse(sources, ["flower==2.2.0"], work)
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(work)], check=True)
    [requirements] = work.glob("*/requirements.txt")
    site = work / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-index"]
    pip += ["--find-links", str(requirements.parent), "--target", str(site), "-r", str(requirements)]
    subprocess.run(pip, check=True, timeout=300)
    # Appended, so the venv's Celery and click still win; only what the venv lacks comes from here.
    sys.path.append(str(site))
    try:
        yield site
    finally:
        sys.path.remove(str(site))


@pytest.fixture(scope="module")
def flower_options(flower) -> Any:
    from flower.options import default_options  # noqa: PLC0415

    return default_options


SAMPLES = {bool: "true", int: "1", float: "1.5", str: "x"}


def flower_cases(default_options: Any) -> Iterator[tuple[list[str], list[str] | None]]:
    """(args, the names set, or None for an error) for every option and spelling Flower takes."""
    command = cli_report.flower_command()
    ctx = cli_report.sub_context(GROUP_CTX, command, "flower")
    click_opts = {o for p in command.get_params(ctx) if isinstance(p, click.Option) for o in p.opts}
    for option in default_options._options.values():
        name = option.name.replace("-", "_")
        for spelling in dict.fromkeys([name, name.replace("_", "-")]):
            if f"--{spelling}" in click_opts:
                continue  # click takes it first (--help); tested on its own
            sample = SAMPLES.get(option.type)
            expected = [name] if sample is not None else None  # e.g. format_task: no string converts
            yield [f"--{spelling}={sample or 'x'}"], expected
            if option.type is bool:
                yield [f"--{spelling}"], [name]
            if option.multiple and sample is not None:
                yield [f"--{spelling}={sample},{sample}"], [name]


def test_every_flower_option_in_every_spelling(flower_options):
    cases = list(flower_cases(flower_options))
    spelled = {args[0].partition("=")[0] for args, _ in cases}
    assert spelled >= {"--basic-auth", "--basic_auth", "--port", "--address", "--debug"}
    wrong = []
    for args, expected in cases:
        result = cli_report.parse_one(GROUP_CTX, {"command": "flower", "args": args})
        if expected is None:
            ok = result["error"] and result["set"] == [] and "\n" not in result["error"]
        else:
            ok = result == {"set": expected, "extra": [], "error": None}
        if not ok:
            wrong.append((args, expected, result))
    assert wrong == []
    # Only options whose type takes no string fail: the cases really parsed values.
    assert [a for a, e in cases if e is None] == [["--format_task=x"], ["--format-task=x"]]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # Flower drops, before tornado sees them, arguments that name none of its options: Celery's
        # own, values given apart, and --unauthenticated-api (an environment variable only).
        (
            ["--port=1", "-A", "proj", "--unauthenticated-api", "--debug", "5555"],
            {
                "set": ["port", "debug"],
                "extra": ["-A", "proj", "--unauthenticated-api", "5555"],
                "error": None,
            },
        ),
        (["--port", "5555"], {"set": [], "extra": [], "error": "Option 'port' requires a value"}),
        (["--address", "0.0.0.0"], {"set": [], "extra": [], "error": "Option 'address' requires a value"}),
        (["--port=abc"], {"set": [], "extra": [], "error": "invalid literal for int() with base 10: 'abc'"}),
        # A bare word that names an option is kept, and tornado stops there: the rest is ignored.
        (
            ["--debug", "port", "--address=0.0.0.0"],
            {"set": ["debug"], "extra": ["port", "--address=0.0.0.0"], "error": None},
        ),
        # click takes --help before tornado does.
        (["--help"], {"set": ["_click_default_help"], "extra": [], "error": None}),
        (["--help=true"], {"set": [], "extra": [], "error": "Option '--help' does not take a value."}),
        (["--", "--basic-auth=u:p"], {"set": ["basic_auth"], "extra": [], "error": None}),
        (["--items"], {"set": [], "extra": [], "error": "Unrecognized command line option: 'items'"}),
    ],
)
def test_flower_reads_its_arguments_the_way_flower_does(flower_options, args, expected):
    assert cli_report.parse_one(GROUP_CTX, {"command": "flower", "args": args}) == expected


def test_flower_parsing_leaves_the_global_options_alone(flower_options, capsys):
    help_callback = flower_options._options["help"].callback
    port = flower_options.port
    args = ["--port=1", "--help", "--", "--help", "--conf=/nonexistent", "--nope"]
    cli_report.parse_one(GROUP_CTX, {"command": "flower", "args": args})
    assert flower_options.port == port
    assert flower_options._options["help"].callback == help_callback
    assert capsys.readouterr() == ("", "")  # neither tornado's help nor its complaint


def test_flower_envvars_are_those_flower_reads(flower_options):
    from flower.command import is_flower_envvar  # noqa: PLC0415

    envvars = cli_report.flower_envvars()
    assert {"FLOWER_BASIC_AUTH", "FLOWER_PORT", "FLOWER_ADDRESS", "FLOWER_AUTH"} <= set(envvars)
    assert all(is_flower_envvar(name) for name in envvars)
    assert len(envvars) == len(flower_options._options)


# The script itself, as the Ansible module runs it.


def run_script(stdin: str, *paths: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *paths])}
    return subprocess.run(
        [sys.executable, "-m", "celery_fleet.cli_report"],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_script_prints_one_json_object():
    arguments = [{"command": "worker", "args": ["-EB"]}, {"command": "beat", "args": ["-A", "x"]}]
    proc = run_script(json.dumps(arguments))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["parsed"] == [cli_report.parse_one(GROUP_CTX, a) for a in arguments]
    assert data["envvars"] == cli_report.celery_envvars(GROUP_CTX)
    if importlib.util.find_spec("flower") is None:  # the venv's; the wheelhouse's is tested above
        flower = run_script('[{"command": "flower", "args": ["--port=1"]}]')
        assert json.loads(flower.stdout)["parsed"] == [
            {"set": [], "extra": [], "error": "flower is not installed in the wheelhouse"}
        ]
        assert json.loads(flower.stdout)["flower_envvars"] == []


@pytest.mark.parametrize("stdin", ["not json", '{"command": "worker"}', "[1]"])
def test_script_refuses_what_is_not_a_list_of_commands(stdin):
    proc = run_script(stdin)
    assert proc.returncode == 1
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("celery-fleet-cli-report: ")


def test_every_flower_option_is_judged_exactly_once(flower_options):
    from ansible_collections.celery_fleet.fleet.plugins.module_utils import ownership  # noqa: PLC0415

    judged = [*ownership.FLOWER_OWNED, *ownership.FLOWER_UNIT, *ownership.FLOWER_ALLOWED]
    assert len(judged) == len(set(judged))
    options = {o.name.replace("-", "_") for o in flower_options._options.values()}
    # unauthenticated_api is read from the environment only (FLOWER_UNAUTHENTICATED_API), owned all the same.
    assert set(judged) - {"unauthenticated_api"} == options
