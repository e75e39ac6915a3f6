"""Prometheus metrics of the fleet's queues that no exporter of the ecosystem gives.

``celery-fleet-metrics`` runs on the broker host, reads Redis as the read-only ``celery-metrics`` user,
and serves, for every queue the fleet routes to:

- ``celery_fleet_queue_messages``: the messages waiting, its priority sub-queues summed (kombu keeps a
  message with a priority in ``<queue>\\x06\\x16<step>``, which a key check of the Redis exporter misses);
- ``celery_fleet_queue_oldest_message_age_seconds``: how long the next message to be consumed has waited.

Redis lists hold no times, so the age is measured. Each poll reads the head of every list (kombu pushes
there) down to the first message it has seen before, and stamps the new ones, by delivery tag, with the
time it first saw them; the oldest message is the list's tail (consumers pop it), and its age is the
time since its stamp. It is exact to one poll, except for messages already waiting when the exporter
started (stamped with its start, so their age is a lower bound) and bursts of more than ``MAX_NEW`` in
one poll (the rest stamped when first seen at the tail).

``celery_fleet_node_unacked_messages`` counts, per worker node, what it took and has not acknowledged
(``celery_fleet.worker`` keeps it under the node's own keys).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from celery_fleet.worker import NODES_KEY, unit_keys

LOG = logging.getLogger("celery_fleet.metrics")

# kombu's Redis transport: priority sub-queues are "<queue><SEP><step>" for the steps above 0.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
PAGE = 100
MAX_NEW = 10_000  # messages stamped per list and poll; a larger burst is stamped as it reaches the tail


def sub_queues(queue: str) -> list[str]:
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def delivery_tag(raw: bytes) -> str:
    """The delivery tag kombu gives every message, or the raw bytes' hash for a message without one."""
    try:
        return str(json.loads(raw)["properties"]["delivery_tag"])
    except (ValueError, KeyError, TypeError):
        return f"raw:{hash(raw)}"


class ListStamps:
    """When each message of one Redis list was first seen, oldest first."""

    def __init__(self) -> None:
        self.seen: OrderedDict[str, float] = OrderedDict()

    def poll(self, client, key: str, now: float) -> float | None:
        """Stamp the new messages of ``key``; return the stamp of its tail (None: the list is empty)."""
        new: list[str] = []
        for start in range(0, MAX_NEW, PAGE):
            page = client.lrange(key, start, start + PAGE - 1)
            tags = [delivery_tag(raw) for raw in page]
            known = next((i for i, tag in enumerate(tags) if tag in self.seen), None)
            new += tags if known is None else tags[:known]
            if known is not None or len(page) < PAGE:
                break
        # The head is the newest: stamped in order, the oldest new one first.
        for tag in reversed(new):
            self.seen[tag] = now
        tail = client.lindex(key, -1)
        if tail is None:
            self.seen.clear()
            return None
        tail_tag = delivery_tag(tail)
        if tail_tag not in self.seen:
            # A burst past MAX_NEW: the message is seen for the first time now, at the tail.
            self.seen[tail_tag] = now
            self.seen.move_to_end(tail_tag, last=False)
        # Everything older than the tail has been consumed.
        while next(iter(self.seen)) != tail_tag:
            self.seen.popitem(last=False)
        return self.seen[tail_tag]


class QueueWatch:
    """Depth and oldest-message age of the routed queues, one poll at a time."""

    def __init__(self, client, queues: Sequence[str], clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.queues = list(queues)
        self.clock = clock
        self.stamps = {key: ListStamps() for queue in self.queues for key in sub_queues(queue)}

    def poll(self) -> dict[str, dict[str, float]]:
        """``{queue: {"messages": n, "oldest_age": s}}``, read now."""
        now = self.clock()
        out = {}
        for queue in self.queues:
            depth = 0
            oldest: float | None = None
            for key in sub_queues(queue):
                depth += self.client.llen(key)
                stamp = self.stamps[key].poll(self.client, key, now)
                if stamp is not None:
                    oldest = stamp if oldest is None else min(oldest, stamp)
            out[queue] = {"messages": depth, "oldest_age": 0.0 if oldest is None else now - oldest}
        return out

    def unacked(self) -> dict[str, int]:
        """Per node with keys of its own: the messages it took and has not acknowledged."""
        nodes = sorted(n.decode() if isinstance(n, bytes) else n for n in self.client.smembers(NODES_KEY))
        return {node: self.client.hlen(unit_keys({}, node)["unacked_key"]) for node in nodes}


def serve(address: str, port: int, watch: QueueWatch, interval: float, rounds: int | None = None) -> None:
    """Serve /metrics on ``address:port``; poll every ``interval`` seconds (``rounds`` times, or forever)."""
    from prometheus_client import REGISTRY, start_http_server  # noqa: PLC0415 -- keep --help fast
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

    state: dict = {"queues": {}, "unacked": {}, "errors": 0, "up": 0}

    class Collector:
        def collect(self):
            messages = GaugeMetricFamily(
                "celery_fleet_queue_messages",
                "Messages waiting in the queue, priorities summed.",
                labels=["queue"],
            )
            age = GaugeMetricFamily(
                "celery_fleet_queue_oldest_message_age_seconds",
                "How long the next message to be consumed has waited (0: none; a lower bound for messages "
                "older than the exporter).",
                labels=["queue"],
            )
            for queue, values in sorted(state["queues"].items()):
                messages.add_metric([queue], values["messages"])
                age.add_metric([queue], values["oldest_age"])
            unacked = GaugeMetricFamily(
                "celery_fleet_node_unacked_messages",
                "Messages the worker node took and has not acknowledged.",
                labels=["node"],
            )
            for node, count in sorted(state["unacked"].items()):
                unacked.add_metric([node], count)
            up = GaugeMetricFamily("celery_fleet_broker_up", "Whether the last poll of the broker succeeded.")
            up.add_metric([], state["up"])
            errors = CounterMetricFamily(
                "celery_fleet_broker_poll_errors", "Polls of the broker that failed."
            )
            errors.add_metric([], state["errors"])
            yield from (messages, age, unacked, up, errors)

    REGISTRY.register(Collector())
    start_http_server(port, addr=address)
    count = 0
    while rounds is None or count < rounds:
        count += 1
        try:
            state["queues"] = watch.poll()
            state["unacked"] = watch.unacked()
            state["up"] = 1
        except Exception:  # the broker may be away; the next poll tries again
            state["up"] = 0
            state["errors"] += 1
            LOG.exception("celery-fleet-metrics: polling the broker failed")
        time.sleep(interval)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="celery-fleet-metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the address to serve /metrics on (never 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9808)
    parser.add_argument("--queue", action="append", required=True, dest="queues", help="a routed queue")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls of the broker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import redis  # noqa: PLC0415 -- keep --help fast

    client = redis.Redis.from_url(
        os.environ["CELERY_BROKER_URL"], socket_timeout=10, socket_connect_timeout=10
    )
    serve(args.address, args.port, QueueWatch(client, args.queues), args.interval)


if __name__ == "__main__":
    main()
