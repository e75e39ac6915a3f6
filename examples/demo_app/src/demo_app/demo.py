"""Send one probe task through every queue and report where each one ran.

Usage: ``python -m demo_app.demo [--rounds N] [--timeout S]``. Prints one JSON
object: for each queue, the results of its tasks. Exits non-zero if any task
did not come back in time.
"""

from __future__ import annotations

import argparse
import json
import sys

from celery.exceptions import TimeoutError as CeleryTimeoutError

from demo_app.celery import app
from demo_app.tasks import QUEUE_PROBES


def run(rounds: int, timeout: float) -> dict[str, list[dict]]:
    pending = [
        (queue, task.apply_async(args=args))
        for _ in range(rounds)
        for queue, (task, args) in QUEUE_PROBES.items()
    ]
    results: dict[str, list[dict]] = {queue: [] for queue in QUEUE_PROBES}
    for queue, async_result in pending:
        try:
            results[queue].append(async_result.get(timeout=timeout))
        except CeleryTimeoutError:
            results[queue].append({"error": f"no result within {timeout} s", "task_id": async_result.id})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="tasks to send to each queue")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each result")
    args = parser.parse_args(argv)
    try:
        results = run(args.rounds, args.timeout)
    finally:
        app.close()
    json.dump(results, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 1 if any("error" in r for rs in results.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
