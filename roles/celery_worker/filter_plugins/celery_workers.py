"""Expand the ``celery_workers`` list into the worker units of one host."""

from __future__ import annotations

from typing import Any

DOCUMENTATION = r"""
name: celery_worker_instances
short_description: Expand worker entries into systemd instances
description:
  - Takes a host's C(celery_workers) list, fills each entry's defaults, and returns one dict per
    systemd instance of C(celery-worker@.service), with the Celery command line arguments ready.
positional: _input
options:
  _input:
    description: The host's C(celery_workers) list.
    type: list
    elements: dict
    required: true
  defaults:
    description: Values for fields an entry leaves out.
    type: dict
    required: true
"""

EXAMPLES = r"""
instances: "{{ celery_workers | celery_worker_instances(celery_worker_defaults) }}"
"""

RETURN = r"""
_value:
  description: One dict per instance with C(instance), C(queues), C(args) and the entry's fields.
  type: list
  elements: dict
"""

POOLS = ("prefork", "threads", "solo", "gevent", "eventlet")


def worker_args(spec: dict[str, Any]) -> list[str]:
    """The ``celery worker`` arguments of one instance, minus app and node name."""
    args = [
        f"--queues={','.join(spec['queues'])}",
        f"--pool={spec['pool']}",
        f"--concurrency={spec['concurrency']}",
        f"--prefetch-multiplier={spec['prefetch_multiplier']}",
        f"--loglevel={spec['loglevel']}",
    ]
    if spec["pool"] == "prefork" and spec["max_tasks_per_child"]:
        args.append(f"--max-tasks-per-child={spec['max_tasks_per_child']}")
    args.extend(spec["extra_args"])
    return args


def celery_worker_instances(workers: list[dict[str, Any]], defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per systemd instance, in inventory order."""
    instances = []
    for entry in workers:
        spec = {**defaults, **entry}
        if spec["pool"] == "solo":
            spec["concurrency"] = 1
        spec["queues"] = list(spec["queues"])
        spec["extra_args"] = list(spec.get("extra_args") or [])
        instances.append({**spec, "instance": spec["name"], "args": worker_args(spec)})
    return instances


def _instance_of(path: str) -> str | None:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith("celery-worker@") and base.endswith(".service.d"):
        return base[len("celery-worker@") : -len(".service.d")] or None
    if base.endswith(".env"):
        return base[: -len(".env")]
    return None


def celery_worker_stale(paths: list[str], names: list[str]) -> dict[str, list[str]]:
    """Split found instance files into those of instances no longer in the inventory.

    ``paths`` are instance environment files (``<instance>.env``) and drop-in
    directories (``celery-worker@<instance>.service.d``).
    """
    keep = set(names)
    stale = [p for p in paths if _instance_of(p) is not None and _instance_of(p) not in keep]
    return {
        "instances": sorted({i for i in map(_instance_of, stale) if i is not None}),
        "paths": sorted(stale),
    }


NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
FIX = "Fix the entry in this host's celery_workers (group_vars or host_vars)."


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _field_errors(
    where: str, entry: dict[str, Any], spec: dict[str, Any], defaults: dict[str, Any]
) -> list[str]:
    """Problems in one entry's fields, its name aside."""
    errors = []
    queues = spec.get("queues")
    if not isinstance(queues, list) or not queues or not all(isinstance(q, str) and q for q in queues):
        errors.append(f"{where}.queues must be a non-empty list of queue names. {FIX}")
    if spec.get("pool") not in POOLS:
        errors.append(f"{where}.pool {spec.get('pool')!r} is not one of {', '.join(POOLS)}. {FIX}")
    for field in ("concurrency", "prefetch_multiplier", "stop_timeout"):
        if not _positive_int(spec.get(field)):
            errors.append(f"{where}.{field} {spec.get(field)!r} must be a positive integer. {FIX}")
    mtpc = spec.get("max_tasks_per_child")
    if not isinstance(mtpc, int) or isinstance(mtpc, bool) or mtpc < 0:
        errors.append(f"{where}.max_tasks_per_child {mtpc!r} must be 0 (never) or more. {FIX}")
    extra = spec.get("extra_args") or []
    if any(a in ("-B", "--beat") or str(a).startswith("--beat=") for a in extra):
        errors.append(
            f"{where}.extra_args embeds beat in a worker (-B); a second beat dispatches every periodic "
            "task twice. Fix: remove it and list the host in the celery_beat group."
        )
    unknown = sorted(set(entry) - set(defaults) - {"name", "queues"})
    if unknown:
        errors.append(f"{where} has unknown fields {', '.join(unknown)}. {FIX}")
    return errors


def celery_worker_errors(workers: Any, defaults: dict[str, Any]) -> list[str]:
    """Every problem in a ``celery_workers`` list, each naming the variable and the fix."""
    if not isinstance(workers, list):
        return [f"celery_workers must be a list of worker entries. {FIX}"]
    errors = []
    seen: set[str] = set()
    for index, entry in enumerate(workers):
        where = f"celery_workers[{index}]"
        if not isinstance(entry, dict):
            errors.append(f"{where} must be a mapping with name and queues. {FIX}")
            continue
        spec = {**defaults, **entry}
        name = spec.get("name")
        if not isinstance(name, str) or not name or not set(name) <= NAME_CHARS or name[0] in "-_":
            errors.append(f"{where}.name {name!r} must be lowercase letters, digits, '-' or '_'. {FIX}")
        elif name in seen:
            errors.append(f"{where}.name {name!r} is used twice; worker names must be unique. {FIX}")
        else:
            seen.add(name)
            where = f"celery_workers[{name}]"
        errors.extend(_field_errors(where, entry, spec, defaults))
    return errors


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "celery_worker_instances": celery_worker_instances,
            "celery_worker_errors": celery_worker_errors,
            "celery_worker_stale": celery_worker_stale,
        }
