"""Wait until a new worker unit consumes its queues, and prove a task makes the round trip through it.

``celery-fleet-canary`` is the gate of a rollout (``roles/celery_worker/tasks/rollout.yml``): the
old unit is retired only once this exits 0 for its replacement. It runs from the new unit's own
release, with the environment files the unit reads, so it imports the app the worker imports.

A worker that cannot answer because a real task keeps it busy (a solo pool, as GPU units use,
with a backlog) passes on its own log: it started consuming and took that task.

``--retire`` instead tells an old unit, once its replacement serves, to stop taking tasks and to
start the ones it holds; the rollout stops it right after.

Readiness: the worker, asked by its node name, reports every queue it should consume. The
round trip (``--round-trip``): the worker is told to consume a private queue, a task is sent
there and its result read back; the queue is then cancelled and deleted. The task is
``celery.accumulate``, which every Celery app registers and which has no side effect, so any app
works unchanged. Without a result backend the worker's own task count is read instead.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery_fleet.app_report import one_line
from celery_fleet.pause import paused_queues
from celery_fleet.status import load_env

UNIT = "celery-worker@{}.service"
ROUND_TRIP_TASK = "celery.accumulate"
# Celery's log line for a message it took (INFO): proof that it consumes and knows the task.
RECEIVED = re.compile(r"Task [\w.:-]+\[[0-9a-f-]{36}\] received")


class CanaryError(Exception):
    """The unit never became ready, or the round trip failed."""


def unit_state(unit: str) -> tuple[str, int]:
    """The slot unit's ActiveState and how often systemd restarted it."""
    out = subprocess.run(
        ["systemctl", "show", "--property=ActiveState,NRestarts", UNIT.format(unit)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    props = dict(line.partition("=")[::2] for line in out.splitlines())
    return props.get("ActiveState", ""), int(props.get("NRestarts") or 0)


def unit_watch(unit: str) -> Callable[[], None]:
    """A check that raises once the slot unit has failed or been restarted since this call."""
    _, restarts = unit_state(unit)

    def check() -> None:
        state, now = unit_state(unit)
        if state == "failed" or now > restarts:
            raise CanaryError(f"{UNIT.format(unit)} exited while starting (state {state})")

    return check


def unit_log(unit: str) -> str:
    """What the slot unit's current run has logged so far."""
    invocation = subprocess.run(
        ["systemctl", "show", "--property=InvocationID", "--value", UNIT.format(unit)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not invocation:
        return ""
    return subprocess.run(
        ["journalctl", f"_SYSTEMD_INVOCATION_ID={invocation}", "--output=cat", "--no-pager"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout


def busy_with_a_task(log: str, node: str) -> bool:
    """Whether the worker's log says it started consuming and took a real task: a solo pool (or a
    prefork pool with every process busy) may not answer remote control while a task runs."""
    return f"{node} ready." in log and bool(RECEIVED.search(log))


def wait_consuming(
    app: Any,
    node: str,
    queues: set[str],
    deadline: float,
    alive: Callable[[], None],
    *,
    log: Callable[[], str] = str,
) -> bool:
    """Until ``node`` answers and consumes every queue in ``queues``; ``alive`` fails fast if it died.

    True once it answered; False when it did not answer but its ``log`` shows it consuming and busy
    with a real task, which proves as much.
    """
    seen: set[str] | None = None
    while time.monotonic() < deadline:
        alive()
        replies = app.control.inspect(destination=[node], timeout=1.0).active_queues() or {}
        if node in replies:
            seen = {q["name"] for q in replies[node]}
            if queues <= seen:
                return True
        elif busy_with_a_task(log(), node):
            return False
        time.sleep(0.5)
    if seen is None:
        raise CanaryError(f"{node} did not answer")
    raise CanaryError(f"{node} consumes {sorted(seen)}, not yet {sorted(queues - seen)}")


def accepted(app: Any, node: str) -> int:
    stats = app.control.inspect(destination=[node], timeout=1.0).stats() or {}
    return int(stats.get(node, {}).get("total", {}).get(ROUND_TRIP_TASK, 0))


def round_trip(app: Any, node: str, deadline: float) -> None:
    """Send one task through a queue only ``node`` consumes, and see it done."""
    from celery.backends.base import DisabledBackend  # noqa: PLC0415 -- keep --help fast

    name = f"celery-fleet.canary.{node}"
    # The worker declares the queue as Celery does for a missing one; so does this side.
    app.conf.task_create_missing_queues = True
    queue = app.amqp.queues[name]
    token = uuid.uuid4().hex
    with app.connection_for_write() as conn:
        queue(conn.default_channel).declare()
    try:
        reply = app.control.add_consumer(name, destination=[node], reply=True, timeout=5.0) or []
        if not any(node in r and "ok" in r[node] for r in reply):
            raise CanaryError(f"{node} did not take the canary queue ({reply})")
        without_backend = isinstance(app.backend, DisabledBackend)
        before = accepted(app, node) if without_backend else 0
        # Stored even where the app ignores results by default.
        result = app.send_task(ROUND_TRIP_TASK, args=[token], queue=name, ignore_result=False)
        if without_backend:
            while accepted(app, node) <= before:
                if time.monotonic() > deadline:
                    raise CanaryError(f"{node} did not run the canary task")
                time.sleep(0.5)
        else:
            try:
                value = result.get(timeout=max(1.0, deadline - time.monotonic()), propagate=True)
            except Exception as exc:
                raise CanaryError(f"the canary task through {node} failed: {one_line(exc)}") from exc
            finally:
                result.forget()
            if value != [token]:
                raise CanaryError(f"the canary task through {node} returned {value!r}")
    finally:
        app.control.cancel_consumer(name, destination=[node], reply=True, timeout=5.0)
        with app.connection_for_write() as conn:
            queue(conn.default_channel).delete()


def retire(app: Any, node: str, queues: set[str], deadline: float) -> None:
    """Have the old ``node`` stop taking tasks, and wait until it has started every one it reserved.

    A worker reserves messages before a process is free for them, and a warm shutdown keeps the
    ones it has not started until it exits: behind a long task, for as long as that runs. Told to
    cancel its consumers first, it takes no more and starts what it holds; then it is stopped.
    """
    for queue in sorted(queues):
        app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=5.0)
    while time.monotonic() < deadline:
        reserved = app.control.inspect(destination=[node], timeout=1.0).reserved()
        if reserved is None or not reserved.get(node):
            return
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", action="append", required=True, help="environment file the unit reads")
    parser.add_argument("--app", required=True, help="the unit's app module, as `celery --app` takes it")
    parser.add_argument("--unit", required=True, help="the worker slot, as instance.slot (high-1.b)")
    parser.add_argument("--queues", required=True, help="comma-separated queues the worker must consume")
    parser.add_argument("--round-trip", action="store_true", help="also send a task through the worker")
    parser.add_argument(
        "--retire", action="store_true", help="instead: tell --unit (an old slot) to stop taking tasks"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds until the canary fails")
    args = parser.parse_args(argv)
    node = f"{args.unit}@{socket.gethostname()}"
    started = time.monotonic()
    deadline = started + args.timeout
    try:
        load_env(args.env_file)
        from celery.app.utils import find_app  # noqa: PLC0415 -- keep --help fast

        try:
            app = find_app(args.app)
        except Exception as exc:
            raise CanaryError(f"the app {args.app} does not import: {one_line(exc)}") from exc
        try:
            queues = set(filter(None, args.queues.split(",")))
            answered = False
            if args.retire:
                retire(app, node, queues, deadline)
            else:
                log = lambda: unit_log(args.unit)  # noqa: E731 -- one line, read each poll
                answered = wait_consuming(app, node, queues, deadline, unit_watch(args.unit), log=log)
                # A queue paused fleet-wide (playbooks/pause.yml) stays paused on the new worker too.
                for queue in sorted(set(paused_queues()) & queues):
                    app.control.cancel_consumer(queue, destination=[node], reply=answered, timeout=5.0)
            ready = time.monotonic() - started
            # A worker too busy with a real task to answer has made that task's round trip itself.
            if args.round_trip and answered:
                round_trip(app, node, deadline)
        finally:
            app.close()
    except Exception as exc:  # the broker refuses us, systemctl is missing, the canary failed
        sys.stderr.write(f"celery-fleet-canary: {node}: {one_line(exc)}\n")
        return 1
    total = time.monotonic() - started
    json.dump({"node": node, "ready_s": round(ready, 1), "total_s": round(total, 1)}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
