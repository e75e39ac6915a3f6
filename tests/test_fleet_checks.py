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

checks = load_plugin("playbooks/filter_plugins/fleet_checks.py")
instances = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/defaults/main.yml").read_text())[
    "celery_worker_defaults"
]
MIB = 1024 * 1024


def app_report(tmp_path: Path | None = None, tweaks: str = "") -> dict[str, Any]:
    """What celery-fleet-app-report prints for the demo app, its settings changed by ``tweaks``."""
    app, paths = "demo_app", [ROOT / "examples" / "demo_app" / "src", ROOT / "src"]
    if tweaks:
        assert tmp_path is not None
        (tmp_path / "variant_app.py").write_text(
            "from demo_app.celery import app\n\n" + textwrap.dedent(tweaks)
        )
        app, paths = "variant_app", [tmp_path, *paths]
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


def worker(host: str, name: str, queues: list[str], **fields: Any) -> dict[str, Any]:
    """One worker instance as the preflight hands it over: the entry's fields filled from the defaults."""
    [instance] = instances.celery_worker_instances([{"name": name, "queues": queues, **fields}], DEFAULTS)
    return {
        "autoscale": None,
        "time_limit": None,
        "soft_time_limit": None,
        "memory_max": None,
        **instance,
        "host": host,
    }


def lab_fleet() -> list[dict[str, Any]]:
    """Every worker instance of the lab inventory, which runs the demo app."""
    fleet = []
    for path in sorted((ROOT / "inventories/lab/host_vars").glob("*/workers.yml")):
        for entry in yaml.safe_load(path.read_text())["celery_workers"]:
            fleet.append(worker(path.parent.name, entry.pop("name"), entry.pop("queues"), **entry))
    return fleet


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    return app_report()


def queue_of(report: dict[str, Any], task_suffix: str) -> str:
    [queue] = [q for t, q in report["routes"].items() if t.endswith(task_suffix)]
    return queue


def everything_routed(report: dict[str, Any], host: str = "w1", **fields: Any) -> list[dict[str, Any]]:
    return [worker(host, q.replace("_", "-"), [q], **fields) for q in report["routed_queues"]]


def assert_names_host_variable_and_fix(message: str, host: str, variable: str) -> None:
    assert message.startswith(f"{host}:"), message
    assert variable in message, message
    assert "Fix:" in message, message


# Queue coverage


def test_the_lab_fleet_covers_the_demo_app(demo):
    assert checks.celery_queue_coverage(demo, lab_fleet()) == {"errors": [], "warnings": []}


def test_a_routed_queue_without_a_worker_is_an_error(demo):
    queue = queue_of(demo, ".train")
    fleet = [w for w in lab_fleet() if queue not in w["queues"]]
    [error] = checks.celery_queue_coverage(demo, fleet)["errors"]
    assert_names_host_variable_and_fix(error, "fleet", "celery_workers")
    assert f"queue {queue!r} has no worker" in error
    assert "demo_app.tasks.train" in error
    assert "group_vars/celery_workers/workers.yml" in error


def test_the_default_queue_counts_only_when_a_task_routes_to_it(demo, tmp_path):
    # Demo tasks without a route (sleep) fall back to the default queue, so it needs a worker ...
    routed_default = app_report(tmp_path, "app.conf.task_default_queue = 'fallback'\n")
    fallen_back = sorted(t for t, q in routed_default["routes"].items() if q == "fallback")
    assert "demo_app.tasks.sleep" in fallen_back
    [error] = checks.celery_queue_coverage(routed_default, lab_fleet())["errors"]
    assert "queue 'fallback' has no worker" in error
    assert f"the app routes {fallen_back[0]}" in error
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
    assert checks.celery_queue_coverage(catch_all, lab_fleet()) == {"errors": [], "warnings": []}


def test_no_worker_at_all_is_an_error(demo):
    [error] = checks.celery_queue_coverage(demo, [])["errors"]
    assert_names_host_variable_and_fix(error, "fleet", "celery_workers")
    assert "no worker instances" in error
    assert all(queue in error for queue in demo["routed_queues"][:3])


def test_a_consumed_queue_nothing_routes_to_is_a_warning(tmp_path):
    report = app_report(
        tmp_path, "from kombu import Queue\napp.conf.task_queues = [*app.conf.task_queues, Queue('spare')]\n"
    )
    fleet = [*lab_fleet(), worker("w9", "extra", ["spare", "typo_queue"])]
    result = checks.celery_queue_coverage(report, fleet)
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
    result = checks.celery_queue_coverage(report, lab_fleet())
    [warning] = [w for w in result["warnings"] if "demo_app.tasks.tokenize" in w]
    assert_names_host_variable_and_fix(warning, "fleet", "celery_workers")
    assert "KeyError" in warning


# Config doctor


def test_the_lab_fleet_passes_the_doctor(demo):
    assert checks.celery_config_doctor(demo, lab_fleet()) == {"errors": [], "warnings": []}


def test_a_stop_timeout_beyond_the_visibility_timeout_is_an_error(demo):
    visibility = demo["config"]["visibility_timeout"]
    fleet = [
        *lab_fleet(),
        worker("gpu1", "training", [queue_of(demo, ".train")], stop_timeout=visibility + 60),
    ]
    [error] = checks.celery_config_doctor(demo, fleet)["errors"]
    assert_names_host_variable_and_fix(error, "gpu1", "celery_workers[training].stop_timeout")
    assert f"{visibility + 60} s" in error
    assert f"visibility timeout of {visibility} s" in error
    assert "broker_transport_options" in error


def test_the_longest_of_several_limits_is_named(demo):
    visibility = demo["config"]["visibility_timeout"]
    fleet = [
        worker("a", "one", ["x"], stop_timeout=visibility),
        worker("b", "two", ["x"], stop_timeout=60, time_limit=visibility * 2),
    ]
    [error] = checks.celery_config_doctor(demo, fleet)["errors"]
    assert error.startswith(f"b: celery_workers[two].time_limit is {visibility * 2} s")
    assert "1 more limits reach it too" in error


def test_kombus_default_visibility_timeout_applies_when_the_app_sets_none(tmp_path):
    report = app_report(tmp_path, "app.conf.broker_transport_options = {}\n")
    assert report["config"]["visibility_timeout_set"] is False
    visibility = report["config"]["visibility_timeout"]
    fleet = [worker("w1", "long", ["training"], stop_timeout=visibility)]
    [error] = checks.celery_config_doctor(report, fleet)["errors"]
    assert f"visibility timeout of {visibility} s (kombu's Redis default" in error


def test_app_and_task_time_limits_count_against_the_visibility_timeout(demo, tmp_path):
    visibility = demo["config"]["visibility_timeout"]
    app_wide = app_report(tmp_path, f"app.conf.task_time_limit = {visibility}\n")
    [error] = checks.celery_config_doctor(app_wide, lab_fleet())["errors"]
    assert_names_host_variable_and_fix(error, "fleet", "task_time_limit")
    per_task = app_report(
        tmp_path,
        f"app.conf.task_annotations = {{'demo_app.tasks.train': {{'time_limit': {visibility + 1}}}}}\n",
    )
    [error] = checks.celery_config_doctor(per_task, lab_fleet())["errors"]
    assert_names_host_variable_and_fix(
        error, "fleet", f"task 'demo_app.tasks.train' has time_limit {visibility + 1} s"
    )


def test_early_acks_on_long_task_queues_are_a_warning(tmp_path):
    report = app_report(tmp_path, "app.conf.task_acks_late = False\n")
    long_queue = queue_of(report, ".train")
    fleet = [
        worker("gpu1", "training", [long_queue], stop_timeout=1800),
        worker("cpu1", "quick", ["processing"], stop_timeout=60),
    ]
    [warning] = checks.celery_config_doctor(report, fleet)["warnings"]
    assert_names_host_variable_and_fix(warning, "gpu1", "celery_workers[training]")
    assert f"queue {long_queue!r}" in warning
    assert "demo_app.tasks.train" in warning
    assert "app-wide task_acks_late is off" in warning


def test_one_task_acking_early_on_a_long_queue_is_a_warning(tmp_path):
    report = app_report(
        tmp_path, "app.conf.task_annotations = {'demo_app.tasks.train': {'acks_late': False}}\n"
    )
    assert report["config"]["task_acks_late"] is True
    fleet = [worker("gpu1", "training", [queue_of(report, ".train")], time_limit=900, stop_timeout=60)]
    [warning] = checks.celery_config_doctor(report, fleet)["warnings"]
    assert "demo_app.tasks.train are acknowledged on receipt (acks_late=False)" in warning
    assert "(time_limit 900 s)" in warning


def test_prefetching_long_tasks_is_a_warning(demo):
    queue = queue_of(demo, ".train")
    fleet = [
        worker("gpu1", "training", [queue], stop_timeout=1800, prefetch_multiplier=4),
        worker("cpu1", "quick", ["processing"], stop_timeout=60, prefetch_multiplier=4),
    ]
    [warning] = checks.celery_config_doctor(demo, fleet)["warnings"]
    assert_names_host_variable_and_fix(warning, "gpu1", "celery_workers[training].prefetch_multiplier is 4")
    assert "prefetch_multiplier: 1" in warning


@pytest.mark.parametrize("expires", ["None", "0"])
def test_results_that_never_expire_are_a_warning(tmp_path, expires):
    report = app_report(tmp_path, f"app.conf.result_expires = {expires}\n")
    [warning] = checks.celery_config_doctor(report, lab_fleet())["warnings"]
    assert_names_host_variable_and_fix(warning, "fleet", "result_expires")
    assert "noeviction" in warning


def test_a_soft_time_limit_not_below_the_hard_one_is_an_error(demo):
    fleet = [
        worker("w1", "bad", ["processing"], time_limit=600, soft_time_limit=600),
        worker("w1", "good", ["processing"], time_limit=600, soft_time_limit=500),
    ]
    [error] = checks.celery_config_doctor(demo, fleet)["errors"]
    assert_names_host_variable_and_fix(error, "w1", "celery_workers[bad].soft_time_limit 600 s")


def test_instances_of_one_entry_are_reported_once(demo):
    entry = worker("gpu1", "training", [queue_of(demo, ".train")], stop_timeout=1800, prefetch_multiplier=4)
    fleet = [{**entry, "instance": f"training-gpu{i}"} for i in range(4)]
    assert len(checks.celery_config_doctor(demo, fleet)["warnings"]) == 1


# Memory budget


def test_limits_that_fit_the_host_pass():
    workers = [
        worker("w1", "a", ["q"], memory_max=1024 * MIB),
        worker("w1", "b", ["q"], memory_max=512 * MIB),
    ]
    assert checks.celery_memory_budget(workers, "w1", 4096) == {"errors": [], "warnings": []}


def test_limits_beyond_the_hosts_memory_are_an_error():
    entry = worker("w1", "train", ["q"], memory_max=2048 * MIB)
    workers = [{**entry, "instance": f"train-gpu{i}"} for i in range(3)]
    [error] = checks.celery_memory_budget(workers, "w1", 4096)["errors"]
    assert_names_host_variable_and_fix(error, "w1", "memory_max")
    assert "6144 MiB over 3 instances (train 3x2048 MiB)" in error
    assert "4096 MiB of RAM" in error


def test_unbounded_workers_beside_bounded_ones_are_a_warning():
    workers = [worker("w1", "a", ["q"], memory_max=1024 * MIB), worker("w1", "free", ["q"])]
    result = checks.celery_memory_budget(workers, "w1", 4096)
    assert result["errors"] == []
    [warning] = result["warnings"]
    assert_names_host_variable_and_fix(warning, "w1", "celery_workers free set no memory_max")


def test_unknown_host_memory_is_a_warning():
    workers = [worker("w1", "a", ["q"], memory_max=1024 * MIB)]
    [warning] = checks.celery_memory_budget(workers, "w1", None)["warnings"]
    assert_names_host_variable_and_fix(warning, "w1", "memtotal_mb")


def test_the_plugin_exposes_its_filters():
    assert set(checks.FilterModule().filters()) == {
        "celery_queue_coverage",
        "celery_config_doctor",
        "celery_memory_budget",
    }
