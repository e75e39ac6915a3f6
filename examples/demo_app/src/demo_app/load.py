"""Continuous load through the fleet's queues, and the ledger that judges a rollout (``-m demo_app.load``).

``send`` sends one ``record`` task of ``--short`` seconds to every queue each ``--interval``
seconds, one of ``--medium`` seconds to each ``--medium-queue`` every ``--medium-every`` rounds,
and first one ``--long`` task to ``--long-queue``. It stops when ``--stop-file`` appears (or
after ``--max-seconds``) and writes what it sent to ``--sent``.

``check`` waits (``--timeout``) until every sent task has its record in ``demo:records``, then
prints JSON: the ids never recorded (lost), those recorded twice (run twice), each queue's
largest gap between consecutive task starts within ``--since``..``--until``, and the long task's
record (which release it ran on, when it started and finished).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

from demo_app.tasks import RECORDS_KEY, _broker_redis, record


def send(args: argparse.Namespace) -> dict[str, Any]:
    queues = [q for q in args.queues.split(",") if q]
    medium = [q for q in args.medium_queues.split(",") if q]
    sent: dict[str, str] = {}
    long_id = None
    if args.long_queue:
        long_id = record.apply_async(args=[args.long], queue=args.long_queue).id
        sent[long_id] = args.long_queue
    deadline = time.monotonic() + args.max_seconds
    rounds = 0
    while not os.path.exists(args.stop_file) and time.monotonic() < deadline:
        for queue in queues:
            sent[record.apply_async(args=[args.short], queue=queue).id] = queue
        if rounds % args.medium_every == 0:
            for queue in medium:
                sent[record.apply_async(args=[args.medium], queue=queue).id] = queue
        rounds += 1
        time.sleep(args.interval)
    result = {"sent": sent, "long": long_id, "rounds": rounds}
    with open(args.sent, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return {"sent": len(sent), "rounds": rounds}


def largest_gaps(records: list[dict[str, Any]], since: float, until: float) -> dict[str, dict[str, float]]:
    """Per queue, the longest time between two consecutive task starts that overlaps [since, until]."""
    by_queue: dict[str, list[float]] = {}
    for r in records:
        by_queue.setdefault(r["queue"], []).append(r["started"])
    gaps = {}
    for queue, starts in sorted(by_queue.items()):
        starts.sort()
        worst = {"gap": 0.0, "after": starts[0]}
        for before, after in itertools.pairwise(starts):
            if after >= since and before <= until and after - before > worst["gap"]:
                worst = {"gap": round(after - before, 3), "after": before}
        gaps[queue] = worst
    return gaps


def check(args: argparse.Namespace, app: Any) -> dict[str, Any]:
    with open(args.sent, encoding="utf-8") as f:
        ledger = json.load(f)
    sent = ledger["sent"]
    deadline = time.monotonic() + args.timeout
    while True:
        with _broker_redis(app) as client:
            raw = client.lrange(RECORDS_KEY, 0, -1)
        records = [r for r in (json.loads(x) for x in raw) if r["id"] in sent]
        seen = {r["id"] for r in records}
        if seen >= set(sent) or time.monotonic() > deadline:
            break
        time.sleep(1)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    return {
        "sent": len(sent),
        "recorded": len(records),
        "lost": sorted(set(sent) - seen),
        "duplicates": sorted(i for i, n in counts.items() if n > 1),
        "gaps": largest_gaps(records, args.since, args.until),
        "releases": sorted({r["release"] for r in records}),
        "long": next((r for r in records if r["id"] == ledger.get("long")), None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("send", help="send load until the stop file appears")
    s.add_argument("--queues", required=True, help="comma-separated queues for the short tasks")
    s.add_argument("--interval", type=float, default=0.5, help="seconds between rounds")
    s.add_argument("--short", type=float, default=0.2, help="seconds each short task sleeps")
    s.add_argument("--medium-queues", default="", help="queues that also get medium tasks")
    s.add_argument("--medium", type=float, default=3.0, help="seconds each medium task sleeps")
    s.add_argument("--medium-every", type=int, default=4, help="rounds between medium tasks")
    s.add_argument("--long-queue", default="", help="queue of the one long task, sent first")
    s.add_argument("--long", type=float, default=60.0, help="seconds the long task sleeps")
    s.add_argument("--stop-file", required=True)
    s.add_argument("--max-seconds", type=float, default=900.0, help="stop after this long in any case")
    s.add_argument("--sent", required=True, help="where to write the sent task ids")
    c = sub.add_parser("check", help="judge the records of what was sent")
    c.add_argument("--sent", required=True)
    c.add_argument("--since", type=float, required=True, help="start of the window gaps count in (epoch s)")
    c.add_argument("--until", type=float, required=True, help="end of that window (epoch s)")
    c.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every record")
    args = parser.parse_args(argv)
    from demo_app.celery import app  # noqa: PLC0415 -- after the environment is read

    result = send(args) if args.command == "send" else check(args, app)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
