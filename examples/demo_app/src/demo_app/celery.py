"""The Celery application: queues, routes and reliability settings."""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

from demo_app.schedules import every

# The queues mirror a typical ML backend: quick API work, dataset ingestion,
# CPU preprocessing, GPU training and extraction, and background maintenance.
QUEUES = (
    "high_priority",
    "datasets",
    "processing",
    "training",
    "extraction",
    "low_priority",
)

app = Celery("demo_app", include=["demo_app.tasks"])

app.conf.update(
    task_queues=[Queue(name) for name in QUEUES],
    task_default_queue="high_priority",
    task_routes={
        "demo_app.tasks.ping": {"queue": "high_priority"},
        "demo_app.tasks.download_dataset": {"queue": "datasets"},
        "demo_app.tasks.tokenize": {"queue": "processing"},
        "demo_app.tasks.train": {"queue": "training"},
        "demo_app.tasks.extract_features": {"queue": "extraction"},
        "demo_app.tasks.cleanup": {"queue": "low_priority"},
        "demo_app.tasks.tick": {"queue": "low_priority"},
    },
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
