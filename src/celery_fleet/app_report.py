"""Import a Celery app and print its routing and reliability settings as JSON.

``celery-fleet-app-report <app>`` (or ``python -m celery_fleet.app_report``)
finds the app the way ``celery --app <app>`` does, imports its task modules,
and prints ONE JSON object: the default and declared queues, the queue every
task routes to (computed by the app's own router, as ``apply_async`` would),
and the settings that decide whether a crash or a slow task loses or repeats
work. The preflight runs it in a throwaway virtualenv built from the very
wheelhouse the hosts will install, so it sees the code that will run.

It needs only the standard library and Celery, and never contacts a broker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import timedelta
from typing import Any

# kombu's Redis transport redelivers an unacknowledged message after this many
# seconds unless broker_transport_options sets visibility_timeout.
KOMBU_REDIS_VISIBILITY_TIMEOUT = 3600
LIMITS = ("time_limit", "soft_time_limit")


def load_app(name: str) -> Any:
    """The Celery app ``celery --app <name>`` would use, with every task module imported."""
    from celery.app.utils import find_app  # noqa: PLC0415 -- keep --help fast and the error one line

    app = find_app(name)
    # Registers the tasks of `include`, `imports` and autodiscover_tasks(), as a worker does at start.
    app.loader.import_default_modules()
    app.finalize(auto=True)
    return app


def seconds(value: Any) -> float | int | None:
    """A duration setting (number or timedelta) in seconds; None when unset."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    return int(value) if float(value).is_integer() else float(value)


def default_visibility_timeout() -> int:
    try:
        from kombu.transport.redis import Channel  # noqa: PLC0415 -- optional transport module

        return int(Channel.visibility_timeout)
    except ImportError:
        return KOMBU_REDIS_VISIBILITY_TIMEOUT


def route_of(app: Any, task: Any) -> str:
    """The queue ``task.apply_async()`` would publish to."""
    # apply_async merges the task's own execution options, and send_task pops
    # these three before routing.
    options = dict(task._get_exec_options())
    for key in (*LIMITS, "expires"):
        options.pop(key, None)
    routed = app.amqp.router.route(options, task.name, (), {}, task)
    queue = routed.get("queue")
    if queue is None:
        raise LookupError(f"route names no queue (exchange={routed.get('exchange')!r})")
    return str(getattr(queue, "name", queue))


def config_report(conf: Any) -> dict[str, Any]:
    transport = conf.broker_transport_options or {}
    visibility = transport.get("visibility_timeout")
    return {
        "visibility_timeout": seconds(visibility) if visibility is not None else default_visibility_timeout(),
        "visibility_timeout_set": visibility is not None,
        "task_acks_late": bool(conf.task_acks_late),
        "task_reject_on_worker_lost": bool(conf.task_reject_on_worker_lost),
        "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
        "result_expires": seconds(conf.result_expires),
        "task_time_limit": seconds(conf.task_time_limit),
        "task_soft_time_limit": seconds(conf.task_soft_time_limit),
    }


def report(app: Any) -> dict[str, Any]:
    """The app's queues, each task's queue and the settings the preflight checks."""
    conf = app.conf
    routes: dict[str, str] = {}
    route_errors: dict[str, str] = {}
    tasks: dict[str, dict[str, Any]] = {}
    for name in sorted(app.tasks):
        if name.startswith("celery."):
            continue
        task = app.tasks[name]
        try:
            routes[name] = route_of(app, task)
        except Exception as exc:  # a router function may need the real arguments
            route_errors[name] = f"{type(exc).__name__}: {exc}"
        # A task attribute left at None falls back to the app's setting, as the worker does.
        acks_late, hard, soft = (getattr(task, a, None) for a in ("acks_late", *LIMITS))
        tasks[name] = {
            "acks_late": bool(conf.task_acks_late if acks_late is None else acks_late),
            "time_limit": seconds(conf.task_time_limit if hard is None else hard),
            "soft_time_limit": seconds(conf.task_soft_time_limit if soft is None else soft),
        }
    return {
        "default_queue": conf.task_default_queue,
        "declared_queues": [q.name for q in conf.task_queues or []],
        "routes": routes,
        "route_errors": route_errors,
        "routed_queues": sorted(set(routes.values())),
        "config": config_report(conf),
        "tasks": tasks,
    }


def one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", help="the module given to `celery --app`, e.g. demo_app or proj.celery:app")
    args = parser.parse_args(argv)
    try:
        # stdout carries only the JSON object, whatever the app prints while it imports.
        with contextlib.redirect_stdout(sys.stderr):
            data = report(load_app(args.app))
    except (Exception, SystemExit) as exc:
        sys.stderr.write(f"celery-fleet-app-report: cannot load Celery app {args.app!r}: {one_line(exc)}\n")
        return 1
    json.dump(data, sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
