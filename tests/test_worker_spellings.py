"""No spelling of a beat or of a flag a field owns gets past preflight, in extra_args or in env.

The spellings come from Celery's own parser: every option of `celery worker` in every form its click
tokenizer accepts (long and short, `=value` and separate value, short flags glued together), and every
environment variable its click tree reads. Each is run through the same layers as preflight: the
wheelhouse's parser (here the controller's Celery), then celery_cli_errors; the plan for env.
"""

from __future__ import annotations

import pytest
import yaml
from ansible_collections.celery_fleet.fleet.plugins.module_utils.ownership import (
    WORKER_ALLOWED,
    WORKER_BEAT,
    WORKER_FIELDS,
)
from conftest import ROOT, load_plugin
from test_cli_report import CLICK_CASES

from celery_fleet import cli_report

checks = load_plugin("playbooks/filter_plugins/fleet_checks.py")
workers = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/vars/main.yml").read_text())["_celery_worker_fields"]
WORKER_CASES = [(args, names) for command, args, names in CLICK_CASES if command == "worker"]
OWNED = set(WORKER_BEAT) | set(WORKER_FIELDS)
WHERE = "w1: celery_workers[low].extra_args"


def refusals(args: list[str]) -> list[str]:
    """What preflight says of a worker entry with these extra_args."""
    cli = cli_report.report([{"command": "worker", "args": args}])
    source = {"where": WHERE, "command": "worker", "args": args, "env": {}, "env_where": ""}
    return checks.celery_cli_errors(cli, [source])["errors"]


def test_the_spellings_reach_every_owned_and_beat_parameter():
    covered = {name for _, names in WORKER_CASES for name in names}
    assert covered >= OWNED, sorted(OWNED - covered)
    assert any(args == ["-EB"] for args, _ in WORKER_CASES)


@pytest.mark.parametrize(("args", "names"), WORKER_CASES, ids=" ".join)
def test_every_spelling_of_celery_worker_is_refused_unless_allowed(args, names):
    errors = refusals(args)
    if set(names) <= set(WORKER_ALLOWED):
        assert errors == [], errors
        return
    assert errors, f"{args} set {names} and passed"
    text = " ".join(errors)
    assert all(e.startswith(WHERE) and "Fix:" in e for e in errors), errors
    if set(names) & set(WORKER_BEAT):
        assert "turns on a beat inside the worker" in text, text
    for name in set(names) & set(WORKER_FIELDS):
        assert f"which the entry's {WORKER_FIELDS[name]} field owns" in text, text


@pytest.mark.parametrize("args", [["--", "-B"], ["task_default_queue=other"], ["--queues a"], ["-A", "x"]])
def test_what_the_parser_does_not_take_as_an_option_is_refused_too(args):
    assert refusals(args)


def worker_envvars() -> list[str]:
    return [name for name in cli_report.report([])["envvars"]]


@pytest.mark.parametrize("name", worker_envvars())
def test_every_variable_celerys_command_line_reads_is_refused_in_env(name):
    entry = {"name": "low", "queues": ["low_priority"], "env": {name: "1"}}
    plan = workers.celery_worker_plan([entry], DEFAULTS, {"cpus": 2, "app": "demo_app"})
    cli = cli_report.report([{"command": "worker", "args": []}])
    source = {"where": WHERE, "command": "worker", "args": [], "env": {name: "1"}, "env_where": "w1: env"}
    later = checks.celery_cli_errors(cli, [source])["errors"]
    # The CELERY_* names fall to the plan, before the wheelhouse is read; the others (APP, BROKER_URL, ...)
    # to the parsed command line.
    assert plan["errors"] or later, f"env {name} passed"
    if name.startswith("CELERY_"):
        assert plan["errors"] and f"env.{name} is the fleet's to set" in plan["errors"][0]
