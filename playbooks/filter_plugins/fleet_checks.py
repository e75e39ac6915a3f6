"""Preflight checks of the whole fleet against the app's own routing and settings."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

DOCUMENTATION = r"""
name: celery_queue_coverage
short_description: Check the fleet's workers against the app's routing and settings
description:
  - C(celery_queue_coverage) compares the queues the app routes to (the C(report) of the
    C(celery_app_report) module) with the queues the fleet's worker instances consume.
  - C(celery_config_doctor(report, workers)) checks the app's reliability settings against the
    workers (visibility timeout against the longest task, acks_late and prefetch for long tasks,
    result expiry, soft against hard time limits).
  - C(celery_memory_budget(workers_of_host, host, memtotal_mb)) checks that one host's
    C(memory_max) limits fit in its RAM.
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
      - Every worker instance of the fleet, each with C(host), C(instance), C(name), C(queues),
        C(prefetch_multiplier), C(stop_timeout), C(time_limit), C(soft_time_limit), C(memory_max).
    type: list
    elements: dict
    required: true
"""

EXAMPLES = r"""
coverage: "{{ __app_report.report | celery_queue_coverage(fleet_workers) }}"
doctor: "{{ __app_report.report | celery_config_doctor(fleet_workers) }}"
budget: "{{ host_workers | celery_memory_budget(inventory_hostname, ansible_facts.memtotal_mb) }}"
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
MIB = 1024 * 1024
# Where the fleet's worker entries usually live.
WORKERS_VARS = "group_vars/celery_workers/workers.yml"

Result = dict[str, list[str]]


def _result(errors: list[str], warnings: list[str]) -> Result:
    return {"errors": errors, "warnings": warnings}


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _entries(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One worker per (host, entry): the instances of an entry (replicas, GPUs) share its fields."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for worker in workers:
        seen.setdefault((worker["host"], worker["name"]), worker)
    return list(seen.values())


def _longest(worker: dict[str, Any]) -> tuple[int, str]:
    """How long a task of this worker may run, and the field that says so."""
    stop, hard = worker.get("stop_timeout") or 0, worker.get("time_limit") or 0
    return (hard, "time_limit") if hard > stop else (stop, "stop_timeout")


def _where(worker: dict[str, Any]) -> str:
    return f"{worker['host']}: celery_workers[{worker['name']}]"


def celery_queue_coverage(report: dict[str, Any], workers: list[dict[str, Any]]) -> Result:
    """Every queue the app routes to has a worker; every queue a worker consumes gets tasks."""
    tasks_by_queue: dict[str, list[str]] = defaultdict(list)
    for task, queue in sorted((report.get("routes") or {}).items()):
        tasks_by_queue[queue].append(task)
    # The default queue counts only when a task routes to it, which `routes` already says.
    routed = set(tasks_by_queue) | set(report.get("routed_queues") or [])
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
    for worker in _entries(workers):
        for queue in worker["queues"]:
            consumers[queue].append(worker)
    errors = [
        f"fleet: queue {queue!r} has no worker: the app routes {_few(tasks_by_queue[queue])} to it, but no "
        f"celery_workers entry on any host consumes it, so those tasks pile up in the broker. "
        f"Fix: add {queue!r} to the `queues` of a celery_workers entry on some host in celery_workers, "
        f"e.g. {WORKERS_VARS}."
        for queue in sorted(routed - set(consumers))
    ]
    declared = set(report.get("declared_queues") or [])
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
    warnings.extend(
        f"fleet: the app's router needs real arguments to place task {task!r} ({error}), so its queue "
        "was not checked. Fix: make sure a celery_workers entry consumes every queue that router picks."
        for task, error in sorted((report.get("route_errors") or {}).items())
    )
    return _result(errors, warnings)


def _visibility_errors(report: dict[str, Any], workers: list[dict[str, Any]]) -> list[str]:
    """Redis redelivers a task still running after the visibility timeout: it then runs twice."""
    config = report.get("config") or {}
    visibility = config.get("visibility_timeout") or KOMBU_VISIBILITY_TIMEOUT
    limits: list[tuple[int | float, str]] = []
    for worker in _entries(workers):
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


def celery_config_doctor(report: dict[str, Any], workers: list[dict[str, Any]]) -> Result:
    """The app's reliability settings against what the fleet's workers run."""
    config = report.get("config") or {}
    routes = report.get("routes") or {}
    errors = _visibility_errors(report, workers)
    warnings = []
    entries = _entries(workers)
    early: dict[str, list[str]] = defaultdict(list)
    for task, spec in sorted((report.get("tasks") or {}).items()):
        if not spec.get("acks_late") and task in routes:
            early[routes[task]].append(task)
    scope = "app-wide task_acks_late is off" if not config.get("task_acks_late") else "acks_late=False"
    for worker in entries:
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
    for worker in entries:
        soft, hard = worker.get("soft_time_limit"), worker.get("time_limit")
        if soft and hard and soft >= hard:
            errors.append(
                f"{_where(worker)}.soft_time_limit {soft} s is not below its time_limit {hard} s: the hard "
                "limit kills the task before SoftTimeLimitExceeded lets it clean up. "
                "Fix: make soft_time_limit smaller than time_limit in that entry."
            )
    return _result(errors, warnings)


def _mib(size: int | float) -> str:
    return f"{size / MIB:.0f}"


def celery_memory_budget(workers_of_host: list[dict[str, Any]], host: str, memtotal_mb: int | None) -> Result:
    """The memory_max limits of one host's worker instances fit in its RAM."""
    bounded = [w for w in workers_of_host if w.get("memory_max")]
    unbounded = sorted({w["name"] for w in workers_of_host if not w.get("memory_max")})
    warnings = []
    if bounded and unbounded:
        warnings.append(
            f"{host}: celery_workers {_few(unbounded)} set no memory_max while others on this host do: "
            "their memory is unbounded and not in the budget. Fix: set memory_max on those entries."
        )
    if not memtotal_mb:
        if bounded:
            warnings.append(
                f"{host}: ansible_facts.memtotal_mb is unknown, so the memory_max budget was not checked. "
                "Fix: gather facts (gather_facts: true) before the preflight."
            )
        return _result([], warnings)
    total = sum(w["memory_max"] for w in bounded)
    if total <= memtotal_mb * MIB:
        return _result([], warnings)
    count: dict[tuple[str, int], int] = defaultdict(int)
    for worker in bounded:
        count[(worker["name"], worker["memory_max"])] += 1
    breakdown = ", ".join(f"{name} {n}x{_mib(size)} MiB" for (name, size), n in sorted(count.items()))
    return _result(
        [
            f"{host}: the memory_max of its celery_workers adds up to {_mib(total)} MiB over {len(bounded)} "
            f"instances ({breakdown}), more than the host's {memtotal_mb} MiB of RAM: the limits cannot all "
            "hold, and the kernel OOM-kills outside any one worker's limit. Fix: lower memory_max, "
            "replicas or gpus in this host's celery_workers, or move an entry to another host."
        ],
        warnings,
    )


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "celery_queue_coverage": celery_queue_coverage,
            "celery_config_doctor": celery_config_doctor,
            "celery_memory_budget": celery_memory_budget,
        }
