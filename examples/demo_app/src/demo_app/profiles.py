"""Seed profiles: the queues, routes and settings of the apps in ``seeds/``, chosen by ``DEMO_PROFILE``.

Each profile mirrors one real app's routing, so an example inventory can be
deployed with the demo app and checked end to end: every queue the app routes
to must be consumed by a worker of the inventory. ``lab`` is the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

DEMO = "demo_app.tasks."
TICK = DEMO + "tick"


@dataclass(frozen=True)
class Profile:
    name: str
    queues: tuple[str, ...]
    default_queue: str
    # task name -> queue
    routes: dict[str, str]
    # queue -> (task name, args): the task `python -m demo_app.demo` sends through it
    probes: dict[str, tuple[str, tuple[Any, ...]]]
    # Celery settings on top of the common ones in demo_app.celery
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def seed_tasks(self) -> tuple[str, ...]:
        """The seed app's task names, served by one generic demo body."""
        return tuple(name for name in self.routes if not name.startswith(DEMO))


def _first_per_queue(routes: dict[str, str]) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """Probe each queue with the first seed task routed to it."""
    probes: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for name, queue in routes.items():
        if not name.startswith(DEMO):
            probes.setdefault(queue, (name, ()))
    return probes


# A typical ML backend: quick API work, dataset ingestion, CPU preprocessing,
# GPU training and extraction, background maintenance. `make lab` deploys it.
LAB = Profile(
    name="lab",
    queues=("high_priority", "datasets", "processing", "training", "extraction", "low_priority"),
    default_queue="high_priority",
    routes={
        DEMO + "ping": "high_priority",
        DEMO + "download_dataset": "datasets",
        DEMO + "tokenize": "processing",
        DEMO + "train": "training",
        DEMO + "extract_features": "extraction",
        DEMO + "cleanup": "low_priority",
        TICK: "low_priority",
    },
    probes={
        "high_priority": (DEMO + "ping", ()),
        "datasets": (DEMO + "download_dataset", ("demo",)),
        "processing": (DEMO + "tokenize", ("the quick brown fox jumps over the lazy dog the end",)),
        "training": (DEMO + "train", (500,)),
        "extraction": (DEMO + "extract_features", (200,)),
        "low_priority": (DEMO + "cleanup", ()),
    },
)

# seeds/priority-tiers.md: three tiers, one queue each.
_TIERS = {
    "high_priority": ("chat", "images", "asr", "web_search"),
    "medium_priority": ("embeddings", "storage", "promotion", "dataset"),
    "low_priority": ("email", "cleanup", "langfuse", "leaderboard"),
}
_TIER_ROUTES = {f"priority_tiers.{task}": queue for queue, tasks in _TIERS.items() for task in tasks}
PRIORITY_TIERS = Profile(
    name="priority-tiers",
    queues=tuple(_TIERS),
    default_queue="medium_priority",
    routes={**_TIER_ROUTES, TICK: "low_priority"},
    probes=_first_per_queue(_TIER_ROUTES),
)

# seeds/mistudio-queues.md: its routing table, plus a preprocessing task for `processing`.
_MISTUDIO_ROUTES = {
    "mistudio.update_metadata_task": "high_priority",
    "mistudio.download_dataset_task": "datasets",
    "mistudio.tokenize_dataset_task": "datasets",
    "mistudio.preprocess_dataset_task": "processing",
    "mistudio.train_sae_task": "training",
    "mistudio.extract_features_task": "extraction",
    "mistudio.cleanup_task": "low_priority",
}
MISTUDIO = Profile(
    name="mistudio",
    queues=("high_priority", "datasets", "processing", "training", "extraction", "low_priority"),
    # The seed keeps Celery's default queue, `celery`, which none of its workers
    # consume: an unrouted task would wait forever (preflight names it). Here
    # unrouted tasks (the demo's own probes) go to the "quick tasks" queue.
    default_queue="high_priority",
    routes={**_MISTUDIO_ROUTES, TICK: "low_priority"},
    probes=_first_per_queue(_MISTUDIO_ROUTES),
)

# seeds/semantik-*.md: one worker with no -Q, so everything goes to Celery's default queue.
SEMANTIK = Profile(
    name="semantik",
    queues=("celery",),
    default_queue="celery",
    routes={
        "semantik.test_task": "celery",
        "semantik.process_embedding_job_task": "celery",
        TICK: "celery",
    },
    probes={"celery": ("semantik.test_task", ())},
    config={
        "task_soft_time_limit": 3600,
        "task_time_limit": 7200,
        "worker_max_tasks_per_child": 100,
        "result_expires": 3600,
        "worker_prefetch_multiplier": 1,
        "broker_connection_max_retries": 10,
        # Longer than the 2 h hard limit: Redis redelivers an unacknowledged
        # message after this long, so a shorter one would run long jobs twice.
        "broker_transport_options": {"visibility_timeout": 10800},
    },
)

PROFILES = {p.name: p for p in (LAB, PRIORITY_TIERS, MISTUDIO, SEMANTIK)}


def active_profile() -> Profile:
    """The profile ``DEMO_PROFILE`` names; ``lab`` when unset."""
    name = os.environ.get("DEMO_PROFILE") or LAB.name
    if name not in PROFILES:
        raise ValueError(f"DEMO_PROFILE={name!r} is not a demo profile; use one of {', '.join(PROFILES)}")
    return PROFILES[name]
