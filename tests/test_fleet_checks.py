"""Preflight filters, fed with reports of the real demo app (and variants of its settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, load_plugin

from celery_fleet import cli_report

checks = load_plugin("playbooks/filter_plugins/fleet_checks.py")
instances = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/vars/main.yml").read_text())["_celery_worker_fields"]
APP = "demo_app"


def app_report(tmp_path: Path | None = None, tweaks: str = "", module: str = "variant_app") -> dict[str, Any]:
    """What celery-fleet-app-report prints for the demo app, its settings changed by ``tweaks``."""
    app, paths = APP, [ROOT / "examples" / "demo_app" / "src", ROOT / "src"]
    if tweaks:
        assert tmp_path is not None
        (tmp_path / f"{module}.py").write_text(
            "from demo_app.celery import app\n\n" + textwrap.dedent(tweaks)
        )
        app, paths = module, [tmp_path, *paths]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)), "CELERY_BROKER_URL": "memory://"}
    proc = subprocess.run(
        [sys.executable, "-m", "celery_fleet.app_report", app],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def plan_of(host: str, entries: list[dict[str, Any]], app: str = APP) -> list[dict[str, Any]]:
    """A host's worker entries as the preflight hands them over: its plan, each entry with its host."""
    plan = instances.celery_worker_plan(entries, DEFAULTS, {"app": app})
    assert plan["errors"] == [], plan["errors"]
    return [{**entry, "host": host} for entry in plan["entries"]]


def worker(host: str, name: str, queues: list[str], **fields: Any) -> dict[str, Any]:
    """One worker entry, parsed (``app`` among its fields picks the app it runs)."""
    [entry] = plan_of(host, [{"name": name, "queues": queues, **fields}])
    return entry


def lab_fleet() -> list[dict[str, Any]]:
    """Every worker entry of the lab inventory, which runs the demo app."""
    fleet = []
    for path in sorted((ROOT / "inventories/lab/host_vars").glob("*/workers.yml")):
        fleet += plan_of(path.parent.name, yaml.safe_load(path.read_text())["celery_workers"])
    return fleet


def coverage(report: dict[str, Any], fleet: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Coverage of a fleet that runs one app, the demo app (or a variant of its settings)."""
    return checks.celery_queue_coverage({APP: report}, fleet)


def doctor(report: dict[str, Any], fleet: list[dict[str, Any]]) -> dict[str, list[str]]:
    return checks.celery_config_doctor({APP: report}, fleet)


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    return app_report()


def queue_of(report: dict[str, Any], task_suffix: str) -> str:
    [queue] = [q for t, q in report["routes"].items() if t.endswith(task_suffix)]
    return queue


def assert_names_host_variable_and_fix(message: str, host: str, variable: str) -> None:
    assert message.startswith(f"{host}:"), message
    assert variable in message, message
    assert "Fix:" in message, message


def test_the_plugin_exposes_its_filters():
    assert set(checks.FilterModule().filters()) == {
        "celery_queue_coverage",
        "celery_config_doctor",
        "celery_cli_errors",
    }


def test_plan_entries_carry_what_the_checks_read(demo):
    [entry] = plan_of("w1", [{"name": "w", "queues": ["q"], "replicas": 2}])
    assert {"host", "units", "name", "app", "queues", "prefetch_multiplier", "stop_timeout"} <= set(entry)
    assert {"time_limit", "soft_time_limit", "memory_max", "extra_args", "env"} <= set(entry)
    assert entry["units"] == ["w-1", "w-2"]


# Queue coverage


def test_the_lab_fleet_covers_the_demo_app(demo):
    assert coverage(demo, lab_fleet()) == {"errors": [], "warnings": []}


def test_a_routed_queue_without_a_worker_is_an_error(demo):
    queue = queue_of(demo, ".train")
    fleet = [w for w in lab_fleet() if queue not in w["queues"]]
    [error] = coverage(demo, fleet)["errors"]
    assert_names_host_variable_and_fix(error, "fleet", "celery_workers")
    assert f"queue {queue!r} has no worker" in error
    assert "demo_app.tasks.train" in error
    assert f"the app ({APP})" in error
    assert "group_vars/celery_workers/workers.yml" in error


def test_the_default_queue_counts_only_when_a_task_routes_to_it(demo, tmp_path):
    # Demo tasks without a route (sleep) fall back to the default queue, so it needs a worker ...
    routed_default = app_report(tmp_path, "app.conf.task_default_queue = 'fallback'\n")
    fallen_back = sorted(t for t, q in routed_default["routes"].items() if q == "fallback")
    assert "demo_app.tasks.sleep" in fallen_back
    [error] = coverage(routed_default, lab_fleet())["errors"]
    assert "queue 'fallback' has no worker" in error
    assert f"routes {fallen_back[0]}" in error
    # ... but a default queue that no task reaches needs none.
    catch_all = app_report(
        tmp_path,
        """\
        app.conf.task_default_queue = "fallback"
        routes = app.conf.task_routes
        routes = list(routes) if isinstance(routes, (list, tuple)) else [routes]
        app.conf.task_routes = [*routes, {"*": "low_priority"}]
        """,
    )
    assert catch_all["default_queue"] == "fallback"
    assert "fallback" not in catch_all["routed_queues"]
    assert coverage(catch_all, lab_fleet()) == {"errors": [], "warnings": []}


def test_no_worker_at_all_is_an_error(demo):
    [error] = coverage(demo, [])["errors"]
    assert_names_host_variable_and_fix(error, "fleet", "celery_workers")
    assert "no worker instances" in error
    assert all(queue in error for queue in demo["routed_queues"][:3])


def test_a_consumed_queue_nothing_routes_to_is_a_warning(tmp_path):
    report = app_report(
        tmp_path, "from kombu import Queue\napp.conf.task_queues = [*app.conf.task_queues, Queue('spare')]\n"
    )
    fleet = [*lab_fleet(), worker("w9", "extra", ["spare", "typo_queue"])]
    result = coverage(report, fleet)
    assert result["errors"] == []
    declared, unknown = result["warnings"]
    assert_names_host_variable_and_fix(declared, "w9", "celery_workers[extra]")
    assert "'spare', which is declared in task_queues but no task routes to it" in declared
    assert_names_host_variable_and_fix(unknown, "w9", "celery_workers[extra]")
    assert "'typo_queue', which no task of the app routes to, nor does task_queues declare it" in unknown


def test_a_task_routed_by_its_arguments_is_a_warning(tmp_path):
    report = app_report(
        tmp_path,
        """\
        def by_tenant(name, args, kwargs, options, task=None, **_):
            return {"queue": kwargs["tenant"]} if name == "demo_app.tasks.tokenize" else None

        routes = app.conf.task_routes
        app.conf.task_routes = [by_tenant, *(routes if isinstance(routes, (list, tuple)) else [routes])]
        """,
    )
    assert list(report["route_errors"]) == ["demo_app.tasks.tokenize"]
    result = coverage(report, lab_fleet())
    [warning] = [w for w in result["warnings"] if "demo_app.tasks.tokenize" in w]
    assert_names_host_variable_and_fix(warning, "fleet", "celery_workers")
    assert "KeyError" in warning


def test_coverage_merges_the_routes_of_every_app_of_the_fleet(demo, tmp_path):
    # A second app routes one more queue: a fleet of both apps needs a worker for it too.
    extra = app_report(
        tmp_path,
        """\
        routes = app.conf.task_routes
        routes = list(routes) if isinstance(routes, (list, tuple)) else [routes]
        app.conf.task_routes = [{"demo_app.tasks.sleep": "nightly"}, *routes]
        """,
        module="nightly_app",
    )
    assert "nightly" in extra["routed_queues"] and "nightly" not in demo["routed_queues"]
    reports = {APP: demo, "nightly_app": extra}
    [error] = checks.celery_queue_coverage(reports, lab_fleet())["errors"]
    assert (
        "queue 'nightly' has no worker: the app (demo_app, nightly_app) routes demo_app.tasks.sleep" in error
    )
    fleet = [*lab_fleet(), worker("w9", "nightly", ["nightly"], app="nightly_app")]
    assert checks.celery_queue_coverage(reports, fleet) == {"errors": [], "warnings": []}


def test_a_worker_whose_app_lacks_a_task_routed_to_its_queue_is_an_error(demo, tmp_path):
    # A component app that registers one task only, sending to the training queue by default.
    queue = queue_of(demo, ".train")
    lean = app_report(
        tmp_path,
        f"""\
        from celery import Celery

        app = Celery("lean", task_default_queue={queue!r})


        @app.task(name="demo_app.tasks.sleep")
        def sleep() -> None:
            pass
        """,
        module="lean_app",
    )
    assert list(lean["tasks"]) == ["demo_app.tasks.sleep"]
    reports = {APP: demo, "lean_app": lean}
    fleet = [*lab_fleet(), worker("w9", "lean", [queue], app="lean_app")]
    [error] = checks.celery_queue_coverage(reports, fleet)["errors"]
    assert_names_host_variable_and_fix(error, "w9", "celery_workers[lean]")
    assert "demo_app.tasks.train" in error and "unregistered" in error
    # The same app on a queue no task of another app is routed to is fine.
    fleet = [*lab_fleet(), worker("w9", "lean", ["lean-only"], app="lean_app")]
    assert checks.celery_queue_coverage(reports, fleet)["errors"] == []


# Config doctor


def test_the_lab_fleet_passes_the_doctor(demo):
    assert doctor(demo, lab_fleet()) == {"errors": [], "warnings": []}


def test_a_stop_timeout_beyond_the_visibility_timeout_is_an_error(demo):
    visibility = demo["config"]["visibility_timeout"]
    fleet = [
        *lab_fleet(),
        worker("gpu1", "training", [queue_of(demo, ".train")], stop_timeout=visibility + 60),
    ]
    [error] = doctor(demo, fleet)["errors"]
    assert_names_host_variable_and_fix(error, "gpu1", "celery_workers[training].stop_timeout")
    assert f"{visibility + 60} s" in error
    assert f"visibility timeout of {visibility} s" in error
    assert "broker_transport_options" in error


def test_the_longest_of_several_limits_is_named(demo):
    visibility = demo["config"]["visibility_timeout"]
    fleet = [
        worker("a", "one", ["x"], stop_timeout=visibility),
        # stop_timeout derives from time_limit, and the plan refuses one below it.
        worker("b", "two", ["x"], time_limit=visibility * 2),
    ]
    [error] = doctor(demo, fleet)["errors"]
    assert error.startswith(f"b: celery_workers[two].stop_timeout is {visibility * 2} s")
    assert "1 more limits reach it too" in error


def test_kombus_default_visibility_timeout_applies_when_the_app_sets_none(tmp_path):
    report = app_report(tmp_path, "app.conf.broker_transport_options = {}\n")
    assert report["config"]["visibility_timeout_set"] is False
    visibility = report["config"]["visibility_timeout"]
    fleet = [worker("w1", "long", ["training"], stop_timeout=visibility)]
    [error] = doctor(report, fleet)["errors"]
    assert f"visibility timeout of {visibility} s (kombu's Redis default" in error


def test_app_and_task_time_limits_count_against_the_visibility_timeout(demo, tmp_path):
    visibility = demo["config"]["visibility_timeout"]
    app_wide = app_report(tmp_path, f"app.conf.task_time_limit = {visibility}\n")
    [error] = doctor(app_wide, lab_fleet())["errors"]
    assert_names_host_variable_and_fix(error, "fleet", "task_time_limit")
    per_task = app_report(
        tmp_path,
        f"app.conf.task_annotations = {{'demo_app.tasks.train': {{'time_limit': {visibility + 1}}}}}\n",
    )
    [error] = doctor(per_task, lab_fleet())["errors"]
    assert_names_host_variable_and_fix(
        error, "fleet", f"task 'demo_app.tasks.train' has time_limit {visibility + 1} s"
    )


def test_each_app_is_checked_against_the_workers_that_run_it(demo, tmp_path):
    short = app_report(
        tmp_path, "app.conf.broker_transport_options = {'visibility_timeout': 120}\n", module="short_app"
    )
    reports = {APP: demo, "short_app": short}
    mine = worker("w1", "short", ["training"], stop_timeout=600, app="short_app")
    theirs = worker("w1", "long", ["training"], stop_timeout=600)
    [error] = checks.celery_config_doctor(reports, [mine, theirs])["errors"]
    assert error.startswith("w1: celery_workers[short].stop_timeout is 600 s")
    assert "visibility timeout of 120 s" in error
    assert checks.celery_config_doctor(reports, [theirs])["errors"] == []


def test_early_acks_on_long_task_queues_are_a_warning(tmp_path):
    report = app_report(tmp_path, "app.conf.task_acks_late = False\n")
    long_queue = queue_of(report, ".train")
    fleet = [
        worker("gpu1", "training", [long_queue], stop_timeout=1800),
        worker("cpu1", "quick", ["processing"], stop_timeout=60),
    ]
    [warning] = doctor(report, fleet)["warnings"]
    assert_names_host_variable_and_fix(warning, "gpu1", "celery_workers[training]")
    assert f"queue {long_queue!r}" in warning
    assert "demo_app.tasks.train" in warning
    assert "app-wide task_acks_late is off" in warning


def test_one_task_acking_early_on_a_long_queue_is_a_warning(tmp_path):
    report = app_report(
        tmp_path, "app.conf.task_annotations = {'demo_app.tasks.train': {'acks_late': False}}\n"
    )
    assert report["config"]["task_acks_late"] is True
    fleet = [worker("gpu1", "training", [queue_of(report, ".train")], time_limit=900)]
    [warning] = doctor(report, fleet)["warnings"]
    assert "demo_app.tasks.train are acknowledged on receipt (acks_late=False)" in warning
    # The plan derives stop_timeout from time_limit: a task may run that long.
    assert "(stop_timeout 900 s)" in warning


def test_prefetching_long_tasks_is_a_warning(demo):
    queue = queue_of(demo, ".train")
    fleet = [
        worker("gpu1", "training", [queue], stop_timeout=1800, prefetch_multiplier=4),
        worker("cpu1", "quick", ["processing"], stop_timeout=60, prefetch_multiplier=4),
    ]
    [warning] = doctor(demo, fleet)["warnings"]
    assert_names_host_variable_and_fix(warning, "gpu1", "celery_workers[training].prefetch_multiplier is 4")
    assert "prefetch_multiplier: 1" in warning


@pytest.mark.parametrize("expires", ["None", "0"])
def test_results_that_never_expire_are_a_warning(tmp_path, expires):
    report = app_report(tmp_path, f"app.conf.result_expires = {expires}\n")
    [warning] = doctor(report, lab_fleet())["warnings"]
    assert_names_host_variable_and_fix(warning, "fleet", "result_expires")
    assert "noeviction" in warning


def test_the_soft_time_limit_rule_lives_in_the_plan_not_the_doctor(demo):
    entry = {"name": "bad", "queues": ["processing"], "time_limit": 600, "soft_time_limit": 600}
    [error] = instances.celery_worker_plan([entry], DEFAULTS, {"app": APP})["errors"]
    assert "celery_workers[bad].soft_time_limit 600 must be below time_limit 600" in error
    # The doctor no longer repeats it, even for an instance that never went through a plan.
    good = worker("w1", "bad", ["processing"], time_limit=600, soft_time_limit=500)
    assert doctor(demo, [{**good, "soft_time_limit": 600}])["errors"] == []


def test_an_entry_of_many_units_is_reported_once(demo):
    fleet = plan_of(
        "gpu1",
        [{"name": "training", "queues": [queue_of(demo, ".train")], "stop_timeout": 1800, "replicas": 4}],
    )
    fleet = [{**w, "prefetch_multiplier": 4} for w in fleet]
    assert [w["units"] for w in fleet] == [[f"training-{i}" for i in range(1, 5)]]
    assert len(doctor(demo, fleet)["warnings"]) == 1


# Command lines, as Celery's own parser reads them


def source(args: list[str], command: str = "worker", env: dict[str, str] | None = None) -> dict[str, Any]:
    where = "h1: celery_workers[w]" if command == "worker" else f"h1: celery_{command}_extra_args"
    return {
        "where": f"{where}.extra_args" if command == "worker" else where,
        "command": command,
        "args": args,
        "env": env or {},
        "env_where": "h1: celery_workers[w].env" if command == "worker" else "",
    }


def cli_errors(*sources: dict[str, Any]) -> list[str]:
    """celery_cli_errors on what this environment's Celery parser (cli_report) says of ``sources``."""
    cli = cli_report.report([{"command": s["command"], "args": s["args"]} for s in sources])
    return checks.celery_cli_errors(cli, list(sources))["errors"]


@pytest.mark.parametrize(
    "args",
    [[], ["-E"], ["--without-gossip", "--without-mingle"], ["-O", "fair"], ["--statedb=/var/lib/w/state"]],
)
def test_worker_arguments_the_fleet_leaves_to_the_entry_pass(args):
    assert cli_errors(source(args)) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-B"], "turns on a beat inside the worker (beat)"),
        (["--beat"], "turns on a beat inside the worker (beat)"),
        (["-s", "/tmp/schedule"], "turns on a beat inside the worker (schedule_filename)"),
        (["--scheduler=x"], "turns on a beat inside the worker (scheduler)"),
        (["-Q", "other"], "sets queues, which the entry's queues field owns"),
        (["-Xother"], "sets exclude_queues, which the entry's queues field owns"),
        (["--concurrency=4"], "sets concurrency, which the entry's concurrency field owns"),
        (["-n", "x@y"], "sets hostname, which the entry's name field owns"),
        (["--max-memory-per-child=1"], "sets max_memory_per_child, which the entry's max_memory_per_child"),
        (["--detach"], "sets detach, which the unit owns"),
        (["--purge"], "sets purge, which the unit owns: it would discard every queued task"),
        (["--help"], "which celery-fleet does not pass to a worker"),
        (["--nope"], "is refused by `celery worker`'s own parser: No such option '--nope'"),
        (["--app=other"], "is refused by `celery worker`'s own parser: No such option '--app'"),
        (["broker_pool_limit=1"], "ends with ['broker_pool_limit=1'], which Celery reads as app settings"),
    ],
)
def test_worker_arguments_the_fleet_owns_are_refused(args, fragment):
    [error] = cli_errors(source(args))
    assert error.startswith("h1: celery_workers[w].extra_args"), error
    assert fragment in error, error
    assert "Fix:" in error


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-interval=5"], None),
        (["--loglevel=DEBUG"], "sets loglevel, which the fleet owns: set celery_beat_loglevel instead"),
        (["-s", "/tmp/x"], "sets schedule, which the fleet owns"),
        (["-B"], "is refused by `celery beat`'s own parser"),
    ],
)
def test_beat_arguments_are_judged_by_celery_beats_parser(args, fragment):
    found = cli_errors(source(args, "beat"))
    if fragment is None:
        assert found == []
    else:
        [error] = found
        assert error.startswith("h1: celery_beat_extra_args") and fragment in error, error


def test_environment_celerys_command_line_reads_is_refused():
    # Names without the CELERY_ prefix that Celery's command line still reads as its own options.
    [error] = cli_errors(source([], env={"BROKER_URL": "redis://elsewhere", "MODEL": "x"}))
    assert error.startswith("h1: celery_workers[w].env sets BROKER_URL, which Celery's command line reads")
    assert "Fix:" in error


def test_each_source_is_named_in_its_own_error():
    found = cli_errors(source(["-B"]), source(["--max-interval=5"], "beat"), source(["--purge"]))
    assert len(found) == 2
    assert all(e.startswith("h1: celery_workers[w].extra_args") for e in found)


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        (["url_prefix", "xheaders", "read_only"], None),
        (["debug"], "which the fleet owns: it turns on autoreload"),
        (["cookie_secret"], "a secret on a command line"),
        (["basic_auth"], "set flower_user and flower_password instead"),
        # An option a newer Flower adds is refused until it is judged.
        (["a_new_option"], "it may set only url_prefix"),
    ],
)
def test_flower_arguments_are_judged_against_an_allow_list(names, fragment):
    cli = {"parsed": [{"set": names, "extra": [], "error": None}], "envvars": []}
    errors = checks.celery_cli_errors(cli, [source([f"--{n}=1" for n in names], "flower")])["errors"]
    if fragment is None:
        assert errors == []
    else:
        [error] = errors
        assert error.startswith("h1: celery_flower_extra_args") and fragment in error and "Fix:" in error
