"""The Celery application: queues, routes and reliability settings of the active profile."""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

from demo_app.delivery import DeliveryCappedTask
from demo_app.profiles import active_profile
from demo_app.schedules import every

# The queues and routes of one of the seed apps (DEMO_PROFILE; see profiles.py).
PROFILE = active_profile()
QUEUES = PROFILE.queues


def make_app(main: str) -> Celery:
    """A demo app named ``main``: every one has the same tasks, queues, routes, beat schedule and settings.

    ``demo_app`` is the base app; ``demo_app.apps.<component>`` are the
    per-component apps a fleet starts each worker type and beat with. Only the
    name differs, and the ``whoami`` task reports it.
    """
    # Every task is capped: acks_late + reject_on_worker_lost requeue a task whose
    # process was killed, and one that is killed every time must not loop forever.
    app = Celery(main, include=["demo_app.tasks"], task_cls=DeliveryCappedTask)
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue=PROFILE.default_queue,
        task_routes={task: {"queue": queue} for task, queue in PROFILE.routes.items()},
        # A task is acknowledged only once it has finished, and handed back to the
        # queue if its worker process dies, so a crash never silently drops work.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task at a time per process: long GPU tasks must not hoard messages.
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacknowledged message after this long. It must be
        # longer than the longest task, or the task runs twice.
        broker_transport_options={"visibility_timeout": 7200},
        result_expires=3600,
        task_track_started=True,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        timezone="UTC",
        beat_schedule={
            "tick": {
                "task": "demo_app.tasks.tick",
                "schedule": every(float(os.environ.get("DEMO_TICK_SECONDS", "5"))),
            },
        },
    )
    app.conf.update(PROFILE.config)
    return app


app = make_app("demo_app")
