"""Pause and resume queues fleet-wide: ``celery-fleet-pause pause|resume|list``.

A paused queue keeps its messages; no worker takes them. The paused set lives in the broker
(``PAUSED_KEY``), so every host, the status table and verify see the same one, and a worker that
a rollout starts is told to leave paused queues alone before its old unit is retired
(``celery_fleet.canary``). ``pause`` cancels the queue's consumers on every worker (Celery's
``cancel_consumer``, a broadcast); ``resume`` adds them back on the workers whose unit is
configured to consume it (``--consumer queue=instance@hostname``, from the inventory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from celery_fleet.app_report import one_line

PAUSED_KEY = "celery-fleet:paused"


def redis_client() -> Any:
    import redis  # noqa: PLC0415 -- keep --help fast

    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"], socket_timeout=10, socket_connect_timeout=10)


def paused_queues() -> list[str]:
    client = redis_client()
    try:
        return sorted(q.decode() for q in client.smembers(PAUSED_KEY))
    finally:
        client.close()


def instance_key(node: str) -> str:
    """``high-1.b@host`` -> ``high-1@host``: the slot does not matter to what a unit consumes."""
    name, _, host = node.partition("@")
    return f"{name.partition('.')[0]}@{host}"


def consuming(app: Any, queues: set[str]) -> dict[str, list[str]]:
    """Every node that consumes any of ``queues`` now, with those it consumes."""
    replies = app.control.inspect(timeout=2.0).active_queues() or {}
    found = {node: sorted({q["name"] for q in qs} & queues) for node, qs in replies.items()}
    return {node: qs for node, qs in sorted(found.items()) if qs}


def pause(app: Any, queues: set[str], deadline: float) -> dict[str, Any]:
    client = redis_client()
    try:
        client.sadd(PAUSED_KEY, *sorted(queues))
    finally:
        client.close()
    left: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        for queue in sorted(queues):
            app.control.cancel_consumer(queue, reply=True, timeout=2.0)
        left = consuming(app, queues)
        if not left:
            return {"paused": sorted(queues)}
    raise RuntimeError(f"still consumed after cancel_consumer: {left}")


def resume(app: Any, queues: set[str], consumers: dict[str, set[str]], deadline: float) -> dict[str, Any]:
    client = redis_client()
    try:
        client.srem(PAUSED_KEY, *sorted(queues))
    finally:
        client.close()
    nodes = sorted(app.control.inspect(timeout=2.0).ping() or {})
    wanted = {
        node: sorted(q for q in queues if instance_key(node) in consumers.get(q, set())) for node in nodes
    }
    wanted = {node: qs for node, qs in wanted.items() if qs}
    while time.monotonic() < deadline:
        for node, qs in wanted.items():
            for queue in qs:
                app.control.add_consumer(queue, destination=[node], reply=True, timeout=2.0)
        now = consuming(app, queues)
        missing = {node: qs for node, qs in wanted.items() if set(qs) - set(now.get(node, []))}
        if not missing:
            return {"resumed": sorted(queues), "consumers": sorted(wanted)}
    raise RuntimeError(f"did not take the queues again: {missing}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", action="append", required=True, help="environment file the units read")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds until the change must show")
    parser.add_argument("command", choices=["pause", "resume", "list"])
    parser.add_argument("queues", nargs="*")
    parser.add_argument(
        "--consumer",
        action="append",
        default=[],
        help="for resume: queue=instance@hostname, a unit configured to consume the queue (repeatable)",
    )
    args = parser.parse_args(argv)
    from celery_fleet.status import load_env  # noqa: PLC0415 -- status imports this module

    try:
        load_env(args.env_file)
        if args.command == "list":
            result: dict[str, Any] = {"paused": paused_queues()}
        else:
            if not args.queues:
                raise ValueError(f"{args.command} needs the queues to {args.command}")
            from celery import Celery  # noqa: PLC0415 -- keep --help fast

            app = Celery("celery-fleet-pause")
            deadline = time.monotonic() + args.timeout
            try:
                if args.command == "pause":
                    result = pause(app, set(args.queues), deadline)
                else:
                    consumers: dict[str, set[str]] = {}
                    for item in args.consumer:
                        queue, _, key = item.partition("=")
                        consumers.setdefault(queue, set()).add(key)
                    result = resume(app, set(args.queues), consumers, deadline)
            finally:
                app.close()
    except Exception as exc:  # an unreadable env file, a broker that refuses us, a worker that did not follow
        sys.stderr.write(f"celery-fleet-pause: {one_line(exc)}\n")
        return 1
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
