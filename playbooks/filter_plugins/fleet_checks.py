"""Preflight checks of the whole fleet against the app's own routing and settings."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ansible_collections.celery_fleet.fleet.plugins.module_utils.ownership import (
    BEAT_ALLOWED,
    BEAT_OWNED,
    FLOWER_ALLOWED,
    FLOWER_OWNED,
    FLOWER_UNIT,
    WORKER_ALLOWED,
    WORKER_BEAT,
    WORKER_FIELDS,
    WORKER_UNIT,
)

DOCUMENTATION = r"""
name: celery_queue_coverage
short_description: Check the fleet's workers against the app's routing and settings
description:
  - C(celery_queue_coverage) compares the queues the app routes to (the C(report) of the
    C(celery_app_report) module) with the queues the fleet's worker instances consume.
  - C(celery_config_doctor(report, workers)) checks the app's reliability settings against the
    workers (visibility timeout against the longest task, acks_late and prefetch for long tasks,
    result expiry, soft against hard time limits).
  - C(celery_cli_errors(cli, sources)) checks what C(extra_args) and C(env) set, as the wheelhouse's own
    Celery and Flower parsers read them (the C(cli) result of C(celery_app_report)), against what the
    fleet owns.
  - Coverage and doctor take the app reports by app module (C(reports) of C(celery_app_report)).
  - Each returns C(errors) and C(warnings); every message names the host (or C(fleet)), the
    variable and the fix.
positional: _input, workers
options:
  _input:
    description: The app report, as C(celery_app_report) returns it.
    type: dict
    required: true
  workers:
    description:
      - Every worker entry of the fleet, as its host's plan parsed it (C(entries) of
        C(celery_worker_plan)), each with C(host), C(name), C(app), C(queues), C(prefetch_multiplier),
        C(stop_timeout), C(time_limit), C(soft_time_limit), C(memory_max).
    type: list
    elements: dict
    required: true
"""

EXAMPLES = r"""
coverage: "{{ __app_report.report | celery_queue_coverage(fleet_workers) }}"
doctor: "{{ __app_report.report | celery_config_doctor(fleet_workers) }}"
cli: "{{ __app_report.cli | celery_cli_errors(sources) }}"
"""

RETURN = r"""
_value:
  description: C(errors) (the play must stop) and C(warnings), lists of messages.
  type: dict
"""

# kombu's Redis transport redelivers an unacknowledged message after this long
# unless the app sets broker_transport_options visibility_timeout.
KOMBU_VISIBILITY_TIMEOUT = 3600
# A task that may run longer than this is "long": losing or hoarding it costs.
LONG_TASK_SECONDS = 300
# Where the fleet's worker entries usually live.
WORKERS_VARS = "group_vars/celery_workers/workers.yml"

Result = dict[str, list[str]]


def _result(errors: list[str], warnings: list[str]) -> Result:
    return {"errors": errors, "warnings": warnings}


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _longest(worker: dict[str, Any]) -> tuple[int, str]:
    """How long a task of this worker may run, and the field that says so."""
    stop, hard = worker.get("stop_timeout") or 0, worker.get("time_limit") or 0
    return (hard, "time_limit") if hard > stop else (stop, "stop_timeout")


def _where(worker: dict[str, Any]) -> str:
    return f"{worker['host']}: celery_workers[{worker['name']}]"


def _merged(
    reports: dict[str, dict[str, Any]],
) -> tuple[dict[str, list[str]], set[str], set[str], dict[str, str]]:
    """Tasks by queue, routed and declared queues, and route errors, across every app of the fleet."""
    tasks_by_queue: dict[str, list[str]] = defaultdict(list)
    routed: set[str] = set()
    declared: set[str] = set()
    route_errors: dict[str, str] = {}
    for report in reports.values():
        for task, queue in sorted((report.get("routes") or {}).items()):
            if task not in tasks_by_queue[queue]:
                tasks_by_queue[queue].append(task)
        # The default queue counts only when a task routes to it, which `routes` already says.
        routed |= set(report.get("routes", {}).values()) | set(report.get("routed_queues") or [])
        declared |= set(report.get("declared_queues") or [])
        route_errors.update(report.get("route_errors") or {})
    return tasks_by_queue, routed, declared, route_errors


def celery_queue_coverage(reports: dict[str, dict[str, Any]], workers: list[dict[str, Any]]) -> Result:
    """Every queue an app of the fleet routes to has a worker; every queue a worker consumes gets tasks."""
    tasks_by_queue, routed, declared, route_errors = _merged(reports)
    if not workers:
        return _result(
            [
                "fleet: there are no worker instances: celery_workers is empty on every host of the "
                f"celery_workers group, so nothing consumes {_few(sorted(routed)) or 'any queue'}. "
                f"Fix: list worker entries with their queues in celery_workers, e.g. {WORKERS_VARS}."
            ],
            [],
        )
    consumers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for worker in workers:
        for queue in worker["queues"]:
            consumers[queue].append(worker)
    apps = ", ".join(sorted(reports))
    errors = [
        f"fleet: queue {queue!r} has no worker: the app ({apps}) routes {_few(tasks_by_queue[queue])} to "
        f"it, but no celery_workers entry on any host consumes it, so those tasks pile up in the broker. "
        f"Fix: add {queue!r} to the `queues` of a celery_workers entry on some host in celery_workers, "
        f"e.g. {WORKERS_VARS}."
        for queue in sorted(routed - set(consumers))
    ]
    warnings = []
    for queue in sorted(set(consumers) - routed):
        why = (
            "is declared in task_queues but no task routes to it"
            if queue in declared
            else "no task of the app routes to, nor does task_queues declare it"
        )
        warnings.extend(
            f"{_where(worker)} consumes queue {queue!r}, which {why}: the worker idles unless another "
            f"app sends there. Fix: remove {queue!r} from that entry's queues, or route tasks to it "
            "(the app's task_routes)."
            for worker in consumers[queue]
        )
    errors += _unregistered_errors(reports, tasks_by_queue, consumers)
    warnings.extend(
        f"fleet: the app's router needs real arguments to place task {task!r} ({error}), so its queue "
        "was not checked. Fix: make sure a celery_workers entry consumes every queue that router picks."
        for task, error in sorted(route_errors.items())
    )
    return _result(errors, warnings)


def _unregistered_errors(
    reports: dict[str, dict[str, Any]],
    tasks_by_queue: dict[str, list[str]],
    consumers: dict[str, list[dict[str, Any]]],
) -> list[str]:
    """A worker whose app lacks a task routed to its queue discards that task ("unregistered task")."""
    errors = []
    for queue, workers in sorted(consumers.items()):
        for worker in workers:
            report = reports.get(worker.get("app", ""))
            if report is None:
                continue
            missing = [
                task for task in tasks_by_queue.get(queue, []) if task not in (report.get("tasks") or {})
            ]
            if missing:
                errors.append(
                    f"{_where(worker)} consumes queue {queue!r} with app {worker['app']!r}, which does not "
                    f"register {_few(missing)} routed there by another app of the fleet: the worker "
                    "discards each such task as unregistered. Fix: remove the queue from that entry, or "
                    "set its app to one that includes those tasks."
                )
    return errors


def _visibility_errors(report: dict[str, Any], workers: list[dict[str, Any]]) -> list[str]:
    """Redis redelivers a task still running after the visibility timeout: it then runs twice."""
    config = report.get("config") or {}
    visibility = config.get("visibility_timeout") or KOMBU_VISIBILITY_TIMEOUT
    limits: list[tuple[int | float, str]] = []
    for worker in workers:
        seconds, field = _longest(worker)
        limits.append((seconds, f"{_where(worker)}.{field} is {seconds} s"))
    app_limit = config.get("task_time_limit")
    if app_limit:
        limits.append((app_limit, f"fleet: the app's task_time_limit is {app_limit} s"))
    for task, spec in sorted((report.get("tasks") or {}).items()):
        # A task without its own limit inherits task_time_limit, already counted.
        if spec.get("time_limit") and spec["time_limit"] != app_limit:
            limits.append((spec["time_limit"], f"fleet: task {task!r} has time_limit {spec['time_limit']} s"))
    over = [limit for limit in limits if limit[0] >= visibility]
    if not over:
        return []
    seconds, who = max(over, key=lambda limit: limit[0])
    source = (
        "the app's broker_transport_options visibility_timeout"
        if config.get("visibility_timeout_set")
        else "kombu's Redis default, as the app's broker_transport_options does not set visibility_timeout"
    )
    others = f" ({len(over) - 1} more limits reach it too)" if len(over) > 1 else ""
    return [
        f"{who}, not shorter than the broker's visibility timeout of {visibility} s ({source}){others}: "
        f"Redis hands a task still unacknowledged after {visibility} s to another worker, so it runs twice. "
        f"Fix: raise visibility_timeout in the app's broker_transport_options above {seconds} s, "
        "or lower stop_timeout/time_limit."
    ]


def celery_config_doctor(reports: dict[str, dict[str, Any]], workers: list[dict[str, Any]]) -> Result:
    """Each app's reliability settings against the workers that run it."""
    errors: list[str] = []
    warnings: list[str] = []
    for app, report in sorted(reports.items()):
        runs = [w for w in workers if w.get("app", app) == app]
        app_errors, app_warnings = _app_doctor(report, runs)
        errors += app_errors
        warnings += app_warnings
    return _result(errors, list(dict.fromkeys(warnings)))


def _app_doctor(report: dict[str, Any], workers: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    config = report.get("config") or {}
    routes = report.get("routes") or {}
    errors = _visibility_errors(report, workers)
    warnings = []
    early: dict[str, list[str]] = defaultdict(list)
    for task, spec in sorted((report.get("tasks") or {}).items()):
        if not spec.get("acks_late") and task in routes:
            early[routes[task]].append(task)
    scope = "app-wide task_acks_late is off" if not config.get("task_acks_late") else "acks_late=False"
    for worker in workers:
        seconds, field = _longest(worker)
        if seconds <= LONG_TASK_SECONDS:
            continue
        warnings.extend(
            f"{_where(worker)} runs long tasks ({field} {seconds} s) from queue {queue!r}, but its tasks "
            f"{_few(early[queue])} are acknowledged on receipt ({scope}): a crash, OOM kill or restart "
            "loses them. Fix: set task_acks_late=True and task_reject_on_worker_lost=True in the app's "
            "config, or acks_late=True on those tasks."
            for queue in worker["queues"]
            if early.get(queue)
        )
        if worker.get("prefetch_multiplier", 1) > 1:
            warnings.append(
                f"{_where(worker)}.prefetch_multiplier is {worker['prefetch_multiplier']} while its tasks "
                f"run up to {seconds} s ({field}): each process holds messages other workers could run, and "
                "a reserved message can outwait the visibility timeout and run twice. "
                "Fix: set prefetch_multiplier: 1 on that entry."
            )
    if not config.get("result_expires"):
        warnings.append(
            f"fleet: the app's result_expires is {config.get('result_expires')!r}: task results never expire "
            "and pile up in Redis, which runs maxmemory-policy noeviction and, once full, refuses new "
            "tasks. Fix: set result_expires (seconds, e.g. 86400) in the app's config."
        )
    return errors, warnings


def _worker_arg_errors(where: str, names: list[str]) -> list[str]:
    errors = []
    beat = [n for n in names if n in WORKER_BEAT]
    if beat:
        errors.append(
            f"{where} turns on a beat inside the worker ({', '.join(beat)}): a second beat dispatches every "
            "periodic task twice. Fix: remove it and list the host in the celery_beat group, whose "
            "lease-guarded beat is the fleet's only one."
        )
    for name in names:
        if name in WORKER_BEAT:
            continue
        if name in WORKER_FIELDS:
            errors.append(
                f"{where} sets {name}, which the entry's {WORKER_FIELDS[name]} field owns. "
                f"Fix: remove it from extra_args and set {WORKER_FIELDS[name]} instead."
            )
        elif name in WORKER_UNIT:
            errors.append(f"{where} sets {name}, which the unit owns: {WORKER_UNIT[name]}. Fix: remove it.")
        elif name not in WORKER_ALLOWED:
            errors.append(
                f"{where} sets {name}, which celery-fleet does not pass to a worker. Fix: remove it; "
                f"extra_args may set only {', '.join(WORKER_ALLOWED)}."
            )
    return errors


def _owned_errors(
    where: str, names: list[str], owned: dict[str, str], allowed: tuple[str, ...] | None
) -> list[str]:
    errors = []
    for name in names:
        if name in owned:
            errors.append(f"{where} sets {name}, which the fleet owns: {owned[name]}. Fix: remove it.")
        elif allowed is not None and name not in allowed:
            errors.append(f"{where} sets {name}. Fix: remove it; it may set only {', '.join(allowed)}.")
    return errors


def celery_cli_errors(cli: dict[str, Any], sources: list[dict[str, Any]]) -> Result:
    """What each source's arguments and environment set, as Celery's own parsers read them.

    ``sources`` align with ``cli.parsed``: each has ``where`` (host and variable), ``command`` (worker,
    beat or flower), ``args`` and ``env`` (the environment that unit gets from the inventory).
    """
    errors: list[str] = []
    envvars = set(cli.get("envvars") or [])
    for source, parsed in zip(sources, cli.get("parsed") or [], strict=False):
        where, command = source["where"], source["command"]
        if parsed.get("error"):
            errors.append(
                f"{where} {source['args']!r} is refused by `celery {command}`'s own parser: "
                f"{parsed['error']}. Fix: correct or remove the argument."
            )
            continue
        names = list(parsed.get("set") or [])
        if command == "worker":
            errors += _worker_arg_errors(where, names)
        elif command == "beat":
            errors += _owned_errors(where, names, BEAT_OWNED, BEAT_ALLOWED)
        else:
            errors += _owned_errors(where, names, {**FLOWER_OWNED, **FLOWER_UNIT}, FLOWER_ALLOWED)
        if parsed.get("extra") and command == "flower":
            errors.append(
                f"{where} holds {parsed['extra']!r}, which Flower ignores without a word (no option of its "
                "own takes them). Fix: remove them."
            )
        elif parsed.get("extra"):
            errors.append(
                f"{where} ends with {parsed['extra']!r}, which Celery reads as app settings (key=value) that "
                "override the app's own. Fix: set them in the app's config instead."
            )
    for source in sources:
        read = sorted(set(source.get("env") or {}) & envvars)
        if read:
            errors.append(
                f"{source['env_where']} sets {', '.join(read)}, which Celery's command line reads as its own "
                "options (the app, the broker, the config). Fix: remove them; the unit sets these itself."
            )
    return _result(errors, [])


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "celery_queue_coverage": celery_queue_coverage,
            "celery_config_doctor": celery_config_doctor,
            "celery_cli_errors": celery_cli_errors,
        }
