"""Run ``celery worker`` as a systemd notify unit: ready once it consumes, watched while it runs.

``celery-fleet-worker`` takes exactly ``celery``'s arguments (the units run ``celery-fleet-worker --app
pkg worker ...``) and runs Celery in this very process, so any app works unchanged. Around the worker,
through Celery's public signals and bootsteps:

- readiness: ``READY=1`` once the worker consumes its queues. Celery sends ``worker_ready`` right after
  its first ``consume()``, so ``systemctl start`` returns only then, and a worker that never gets there
  fails its start at ``TimeoutStartSec``.
- watchdog: ``WATCHDOG=1`` comes from a thread, but only while the consumer's main loop still runs the
  small callback the thread hands it (``consumer.call_soon``, which every pool runs from that loop).
  The loop may rightly be busy: a solo pool runs its task inside the loop, so a task running on the
  loop's thread counts as life, and so does a consumer that is (re)connecting or stopping. A prefork or
  threads pool runs tasks elsewhere, so no task length matters to it. A hung loop stops the pings, and
  systemd kills and restarts the unit after ``WatchdogSec``.
- redelivery: the unit's messages taken but not acknowledged wait in a Redis hash of the unit's own
  (kombu's ``unacked_key``, per node name), which its next process hands back to their queues before it
  consumes. Killed by the watchdog or the OOM killer, a worker's tasks return at its restart, not after
  the broker's visibility timeout. For a node that never starts again (its host gone), every worker keeps
  kombu's own rule: a message unacknowledged for longer than the visibility timeout goes back.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence

from celery import bootsteps, signals

from celery_fleet.notify import Notifier

LOG = logging.getLogger("celery_fleet.worker")

# kombu's Redis transport options that name where a consumer keeps its unacknowledged messages.
UNACKED_OPTIONS = {
    "unacked_key": "unacked",
    "unacked_index_key": "unacked_index",
    "unacked_mutex_key": "unacked_mutex",
}
# The node names that keep unacknowledged messages under keys of their own.
NODES_KEY = "celery-fleet:unacked-nodes"
DEFAULT_VISIBILITY_TIMEOUT = 3600  # kombu's Redis transport


class Watchdog:
    """Pings systemd while the consumer's loop runs, or has a good reason not to."""

    def __init__(
        self, notifier: Notifier, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.notifier = notifier
        self.interval = interval  # systemd's WatchdogSec, in seconds
        self.clock = clock
        self.last_tick = clock()
        self.loop_thread: int | None = None
        self.tasks_on_loop = 0  # tasks running on the loop's own thread (the solo pool)
        self.consuming = False  # false while the consumer starts, reconnects or stops
        self.status = ""
        self._stop = threading.Event()
        self._silent_since: float | None = None

    # --- called on the consumer's loop -----------------------------------------------------------------

    def tick(self) -> None:
        self.last_tick = self.clock()
        if not self.consuming:
            self.consuming = True
            self.notifier.send(STATUS=self.status)

    def task_started(self) -> None:
        if threading.get_ident() == self.loop_thread:
            self.tasks_on_loop += 1

    def task_ended(self) -> None:
        if threading.get_ident() == self.loop_thread and self.tasks_on_loop:
            self.tasks_on_loop -= 1

    # --- the pinging thread ----------------------------------------------------------------------------

    def alive(self) -> bool:
        """Whether the loop ran a tick recently, or is rightly busy."""
        return (
            not self.consuming or self.tasks_on_loop > 0 or self.clock() - self.last_tick < self.interval / 2
        )

    def check(self, schedule: Callable[[Callable[[], None]], object]) -> bool:
        """One round: hand the loop a tick, and ping systemd if the loop is alive."""
        schedule(self.tick)
        if self.alive():
            self._silent_since = None
            self.notifier.send(WATCHDOG=1)
            return True
        if self._silent_since is None:
            self._silent_since = self.last_tick
            LOG.error(
                "celery-fleet: the worker's main loop has run nothing for %.0f s and no task holds it; "
                "no more watchdog pings, so systemd restarts the unit within WatchdogSec=%.0f s",
                self.clock() - self.last_tick,
                self.interval,
            )
        return False

    def run(self, schedule: Callable[[Callable[[], None]], object]) -> None:
        while not self._stop.wait(self.interval / 4):
            try:
                self.check(schedule)
            except Exception:  # the thread must outlive any one failed round
                LOG.exception("celery-fleet: watchdog round failed")

    def start(self, schedule: Callable[[Callable[[], None]], object]) -> None:
        threading.Thread(target=self.run, args=(schedule,), name="celery-fleet-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def unit_keys(transport_options: dict, node: str) -> dict:
    """The transport options with this node's own unacknowledged-message keys."""
    options = dict(transport_options or {})
    for option, default in UNACKED_OPTIONS.items():
        options[option] = f"{options.get(option, default)}:{node}"
    return options


def hand_back(connection, node: str) -> int:
    """Return to their queues the messages a previous process of this unit took and never acknowledged."""
    channel = connection.channel()
    try:
        qos = channel.qos
        with channel.conn_or_acquire() as client:
            client.sadd(NODES_KEY, node)
            tags = client.hkeys(qos.unacked_key)
        for tag in tags:
            qos.restore_by_tag(tag)
        return len(tags)
    finally:
        channel.close()


def reclaim(app, node: str, app_options: dict) -> None:
    """Return the messages other nodes took more than the visibility timeout ago: kombu's rule for its one
    shared hash, kept for nodes that may never start again."""
    with (
        app.connection_for_write() as connection,
        connection.channel() as channel,
        channel.conn_or_acquire() as client,
    ):
        nodes = {n.decode() if isinstance(n, bytes) else n for n in client.smembers(NODES_KEY)}
    for other in sorted(nodes - {node}):
        with (
            app.connection_for_write(transport_options=unit_keys(app_options, other)) as connection,
            connection.channel() as channel,
        ):
            channel.qos.restore_visible(num=None)


class Reclaimer:
    """Runs ``reclaim`` at start and then every half visibility timeout (1 to 15 minutes), in a thread."""

    def __init__(self, app, node: str, app_options: dict) -> None:
        self.app, self.node, self.app_options = app, node, app_options
        visibility = float(app_options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))
        self.period = min(max(visibility / 2, 60.0), 900.0)

    def run(self) -> None:
        while True:
            try:
                reclaim(self.app, self.node, self.app_options)
            except Exception:  # the broker may be away; the next round tries again
                LOG.exception("celery-fleet: could not reclaim other nodes' stale unacknowledged messages")
            time.sleep(self.period)

    def start(self) -> None:
        threading.Thread(target=self.run, name="celery-fleet-reclaim", daemon=True).start()


class Fleet:
    """What the launcher adds to one worker process; its handlers are Celery signal receivers."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.watchdog = Watchdog(notifier, notifier.watchdog) if notifier.watchdog else None
        self.reclaimer: Reclaimer | None = None

    def install(self) -> None:
        signals.worker_init.connect(self.on_worker_init, weak=False)
        signals.worker_ready.connect(self.on_worker_ready, weak=False)
        signals.worker_shutting_down.connect(self.on_shutting_down, weak=False)
        signals.task_prerun.connect(self.on_task_started, weak=False)
        signals.task_postrun.connect(self.on_task_ended, weak=False)
        self.notifier.send(STATUS="Connecting to the broker")

    def on_worker_init(self, sender, **_kwargs) -> None:
        app = sender.app
        if app.connection_for_read().transport.driver_type == "redis":
            app_options = dict(app.conf.broker_transport_options or {})
            app.conf.broker_transport_options = unit_keys(app_options, sender.hostname)
            app.steps["consumer"].add(HandBack)
            self.reclaimer = Reclaimer(app, sender.hostname, app_options)
        app.steps["consumer"].add(ConsumerState)

    def on_worker_ready(self, sender, **_kwargs) -> None:
        queues = sorted(q.name for q in sender.task_consumer.queues) if sender.task_consumer else []
        status = f"Consuming {', '.join(queues)}" if queues else "Consuming"
        if self.watchdog:
            self.watchdog.status = status
            self.watchdog.loop_thread = threading.get_ident()
            self.watchdog.last_tick = self.watchdog.clock()
            self.watchdog.consuming = True
            self.watchdog.start(sender.call_soon)
        if self.reclaimer:
            self.reclaimer.start()
        self.notifier.send(READY=1, STATUS=status)

    def on_shutting_down(self, **_kwargs) -> None:
        if self.watchdog:
            self.watchdog.consuming = False
        self.notifier.send(STOPPING=1, STATUS="Finishing the running tasks")

    def on_task_started(self, **_kwargs) -> None:
        if self.watchdog:
            self.watchdog.task_started()

    def on_task_ended(self, **_kwargs) -> None:
        if self.watchdog:
            self.watchdog.task_ended()


FLEET: Fleet | None = None


class HandBack(bootsteps.StartStopStep):
    """Before the first consume: the messages this unit's previous process held go back to their queues."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.done = False

    def start(self, parent) -> None:
        # Once per process: after a reconnect, the messages in the hash are this process's own, still running.
        if self.done:
            return
        self.done = True
        count = hand_back(parent.connection, parent.hostname)
        if count:
            LOG.warning(
                "celery-fleet: handed %d message(s) that this unit's previous process took and never "
                "acknowledged back to their queues",
                count,
            )


class ConsumerState(bootsteps.StartStopStep):
    """Tells the watchdog when the consumer's loop stops for a reconnect or a shutdown."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def stop(self, parent) -> None:
        if FLEET and FLEET.watchdog and FLEET.watchdog.consuming:
            FLEET.watchdog.consuming = False
            FLEET.notifier.send(STATUS="Reconnecting to the broker")


def main(argv: Sequence[str] | None = None) -> None:
    global FLEET  # noqa: PLW0603 -- one worker per process; its bootsteps reach it here
    FLEET = Fleet(Notifier())
    FLEET.install()
    sys.argv = ["celery", *(sys.argv[1:] if argv is None else argv)]
    from celery.__main__ import main as celery_main  # noqa: PLC0415 -- after the handlers, as celery's own entry

    celery_main()


if __name__ == "__main__":
    main()
